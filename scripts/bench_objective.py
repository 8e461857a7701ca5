"""Time the training-objective terms against the log-prob computation every DPO step already does.

For each divergence: forward + backward of `token_divergence` on random logits, divided
by forward + backward of a plain log_softmax + gather (the part of a DPO step that
touches the vocabulary). Also the kernel term (HMK embedding margin) against the plain
DPO loss on the same batch. Usage:

    python scripts/bench_objective.py [--pairs 4] [--seq 256] [--vocab 49152] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from dpo_engine.divergences import ALL_DIVERGENCES, DivergenceConfig, token_divergence
from dpo_engine.kernels import KernelCalibration, KernelConfig, build_kernel
from dpo_engine.losses import embedding_margin, hybrid_dpo_loss


def timed(fn, device: torch.device, repeats: int, clock=time.perf_counter) -> float:
    """Median time of fn() over `repeats` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = clock()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(clock() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4, help="preference pairs (sequences = 2 x pairs)")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576, help="output-embedding width (wasserstein ground cost)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=DivergenceConfig().chunk_positions, help="chunk_positions")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall", help="cpu = process time, fairer on a busy CPU-only machine"
    )
    parser.add_argument("--only", nargs="*", default=list(ALL_DIVERGENCES), help="divergences to time")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)
    n_seq = 2 * args.pairs
    shape = (n_seq, args.seq, args.vocab)
    policy = (2 * torch.randn(shape, generator=gen)).to(device, dtype).requires_grad_(True)
    ref = (policy.detach() + 0.3 * torch.randn(shape, generator=gen).to(device, dtype)).detach()
    labels = torch.randint(0, args.vocab, shape[:2], generator=gen).to(device)
    mask = torch.ones(shape[:2], dtype=torch.bool, device=device)
    mask[:, : args.seq // 4] = False  # prompt tokens
    embeddings = torch.randn(args.vocab, args.hidden, generator=gen).to(device, dtype)
    print(
        f"logits {tuple(shape)} {args.dtype} on {device}; {int(mask.sum())} response positions; "
        f"chunk {args.chunk}; {torch.get_num_threads()} threads; {args.clock} clock"
    )

    def plain() -> None:
        policy.grad = None
        logp = torch.log_softmax(policy.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        (logp * mask).sum().backward()

    base = timed(plain, device, args.repeats, clock)
    print(f"{'plain log_softmax+gather':28s} {base * 1e3:9.1f} ms   (reference)")

    for name in args.only:
        cfg = DivergenceConfig(name=name, chunk_positions=args.chunk)

        def step(cfg: DivergenceConfig = cfg) -> None:
            policy.grad = None
            token_divergence(cfg, policy, ref, mask, output_embeddings=embeddings).backward()

        t = timed(step, device, args.repeats, clock)
        print(
            f"{'divergence ' + name:28s} {t * 1e3:9.1f} ms   ratio {t / base:5.2f}   step with it "
            f"{(base + t) / base:5.2f}x"
        )

    # Kernel term: HMK margin on pooled representations, on top of the plain DPO loss.
    k = min(args.hidden, 256)
    calibration = KernelCalibration.fit(F.normalize(torch.randn(768, k, generator=gen), dim=-1))
    kernel = build_kernel(KernelConfig(name="hmk"), calibration).to(device)
    reps = [
        F.normalize(torch.randn(args.pairs, k, generator=gen), dim=-1).to(device).requires_grad_(True) for _ in range(3)
    ]
    logps = [torch.randn(args.pairs, generator=gen).to(device).requires_grad_(True) for _ in range(4)]

    def dpo_only() -> None:
        plain()
        hybrid_dpo_loss(*logps, beta=0.1, m_emb=None, gamma=0.0, label_smoothing=0.0).loss.backward()

    def dpo_with_kernel() -> None:
        plain()
        m_emb = embedding_margin(kernel, *reps)
        out = hybrid_dpo_loss(
            *logps, beta=0.1, m_emb=m_emb, gamma=0.5, label_smoothing=0.0, loss_entropy=kernel.entropy_penalty()
        )
        out.loss.backward()

    t_dpo = timed(dpo_only, device, args.repeats, clock)
    t_kernel = timed(dpo_with_kernel, device, args.repeats, clock)
    print(f"{'kernel term (hmk)':28s} {t_kernel * 1e3:9.1f} ms   ratio vs plain {t_kernel / t_dpo:5.2f}")


if __name__ == "__main__":
    main()
