"""The training step (METHOD.md 2): which batch comes next, the objective on a batch, the update.

Read top to bottom: `micro_batch` picks the pairs (a pure function of seed and index, so a resumed
run sees the same batches), `compute` turns one batch into the loss terms (preference, kernel
margin, divergence, entropy, ε-DPO steps) with one call to `losses.hybrid_dpo_loss`, and `run`
accumulates, clips, steps the optimiser and returns the metrics.jsonl row. The passes themselves
(packed pairs, LM head on response tokens only) are in passes.py, and where the reference's outputs
come from (cache, live pass, or the policy itself before the first update) is `passes.ReferenceSource`.
No (tokens × vocabulary) tensor outlives a chunk: divergences and ε-DPO's perturbed policies form
logits from the kept hidden states a few rows at a time (lm_head.py).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dpo_engine.divergences import token_divergence_from_hidden
from dpo_engine.lm_head import perturbed_token_logps
from dpo_engine.losses import (
    LossOutput,
    embedding_margin,
    epsilon_dpo_beta_per_pair,
    epsilon_dpo_steps_from_token_logps,
    epsilon_grid,
    hybrid_dpo_loss,
    update_beta,
)
from dpo_engine.train.config import TrainConfig
from dpo_engine.train.data import Batch
from dpo_engine.train.parts import TrainingParts, TrainState
from dpo_engine.train.passes import ForwardOut, ModelPasses, ReferenceSource


class TrainingDiverged(RuntimeError):
    """A loss term or the gradient became NaN/inf; the message says where and what to try."""


@dataclass
class StepTerms:
    """Per-batch quantities shared by the training step and evaluation."""

    out: LossOutput
    n_tokens: int
    n_computed: int = 0  # positions the model ran over (the batch's R × L)
    n_padding: int = 0  # of those, padding
    policy_hidden: torch.Tensor | None = None  # (N × H) final hidden states at the batch's response tokens
    ref_hidden: torch.Tensor | None = None
    policy_head: torch.Tensor | None = None  # (V × H) the LM head weights that turn them into logits
    ref_head: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    steps: torch.Tensor | None = None
    reps: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # projected h(x), h(y+), h(y-)


# fp16 with a gradient scaler: an inf gradient norm is the overflow the scaler exists for (it skips the
# update and halves its scale); only this many overflows in a row mean the run has diverged.
MAX_FP16_OVERFLOW_STREAK = 8


def fp16_overflow_tolerated(accelerator, streak: int) -> bool:
    """True when a non-finite gradient norm is a skipped fp16 step rather than a diverged run."""
    return getattr(accelerator, "scaler", None) is not None and streak < MAX_FP16_OVERFLOW_STREAK


def check_finite(value: torch.Tensor, term: str, config: TrainConfig, state: TrainState) -> None:
    """Raise TrainingDiverged naming the term and the settings that usually bring it back."""
    if not bool(torch.isfinite(value.detach()).all()):
        opt = config.optimisation
        raise TrainingDiverged(
            f"training diverged at step {state.step + 1}: {term} is not finite (NaN or inf). "
            f"Try a lower learning rate (now {opt.lr:g}), model.dtype float32 (now {config.model.dtype}), "
            f"or a smaller beta (now {state.beta:g})"
            + (
                f", or a smaller divergence alpha (now {config.method.divergence.alpha:g})"
                if "divergence" in term
                else ""
            )
        )


class TrainingStep:
    """The objective on a batch and one optimiser step, over the parts setup built and the run's state."""

    def __init__(
        self,
        config: TrainConfig,
        parts: TrainingParts,
        state: TrainState,
        passes: ModelPasses,
        reference: ReferenceSource,
    ) -> None:
        self.config = config
        self.parts = parts
        self.state = state
        self.passes = passes
        self.reference = reference
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation) of the current epoch
        self._checks: list[tuple[str, torch.Tensor]] = []  # (term, all finite?) awaiting `raise_if_not_finite`

    def check_finite(self, value: torch.Tensor, term: str) -> None:
        """Note whether `value` is finite, on its device; `raise_if_not_finite` reads every note at once,
        so a step waits on the device once, not once per term."""
        self._checks.append((term, torch.isfinite(value.detach()).all()))

    def raise_if_not_finite(self) -> None:
        """TrainingDiverged naming the first term noted not finite since the last call, on every process
        when any process saw one (so none is left waiting for the others at a collective)."""
        accelerator = self.parts.accelerator
        if not self._checks and accelerator.num_processes == 1:
            return
        # every process reaches the reduce below, also one that noted nothing (e.g. no evaluation chunk)
        flags = torch.stack([ok for _, ok in self._checks]).tolist() if self._checks else []  # the one read
        bad = [term for (term, _), ok in zip(self._checks, flags) if not ok]
        self._checks.clear()
        n_bad = len(bad)
        if accelerator.num_processes > 1:
            count = torch.tensor([n_bad], device=self.parts.device)
            n_bad = int(accelerator.reduce(count, reduction="sum").item())
        if n_bad:
            check_finite(
                torch.tensor(float("nan")), bad[0] if bad else "a loss term on another process", self.config, self.state
            )

    # ------------------------------------------------------------------ data order
    def micro_batch(self, micro_index: int) -> Batch:
        """Micro-batch number `micro_index` of this process: a pure function of seed and index (exact resume)."""
        opt, parts = self.config.optimisation, self.parts
        epoch, pos = divmod(micro_index, parts.batches_per_epoch)
        perm = self.epoch_order(epoch)
        nproc, rank = parts.accelerator.num_processes, parts.accelerator.process_index
        start = (pos * nproc + rank) * opt.batch_size
        return self.passes.collate([parts.train_pairs[int(i)] for i in perm[start : start + opt.batch_size]])

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The seeded order of the training pairs in `epoch`, drawn once per epoch, not per micro-batch."""
        if self._order is None or self._order[0] != epoch:
            n = len(self.parts.train_pairs)
            self._order = (epoch, np.random.default_rng([self.config.optimisation.seed, epoch]).permutation(n))
        return self._order[1]

    # ------------------------------------------------------------------ the objective
    def compute(
        self,
        batch: Batch,
        *,
        beta: float,
        train: bool,
        keep_hidden: bool = False,
        want_reps: bool = False,
        policy_is_reference: bool = False,
        reference: ForwardOut | None = None,
    ) -> StepTerms:
        """Loss terms for one batch (METHOD.md 2.1-2.7).

        `keep_hidden` keeps both models' token hidden states for the divergence traces, `want_reps` the
        projected representations for snapshots; `reference` gives the reference's outputs already
        computed, and `policy_is_reference` (evaluation before the first update) takes the policy's
        outputs from the reference instead of a second pass (`ReferenceSource` decides either way).
        """
        mcfg = self.config.method
        lcfg, dcfg = mcfg.loss, mcfg.divergence
        passes, kernel = self.passes, self.parts.kernel
        b = batch.n_pairs
        use_kernel = kernel is not None and lcfg.gamma > 0
        use_div = train and dcfg.name != "none" and dcfg.alpha > 0
        use_eps = train and lcfg.epsilon_dpo > 0
        pool = want_reps or (use_kernel and passes.encoder_reps is None)

        if policy_is_reference and not train:
            pol = reference = self.reference.as_policy(batch, pool=pool, hidden=keep_hidden)
        else:
            pol = passes.policy_pass(batch, pool=pool)
        self.check_finite(pol.logps, "policy log-probabilities")
        need_ref_hidden = use_div or use_eps or keep_hidden
        ref = self.reference.for_objective(batch, need_hidden=need_ref_hidden, known=reference)
        ref_logps = ref.logps.to(device=pol.logps.device, dtype=pol.logps.dtype)

        reps = tuple(passes.project(h) for h in pol.pooled) if pol.pooled is not None else None
        m_emb = None
        if use_kernel:
            kernel_reps = passes.encoder_batch(batch) if passes.encoder_reps is not None else reps
            m_emb = embedding_margin(kernel, *kernel_reps)
            self.check_finite(m_emb, "embedding margin (kernel term)")

        loss_div = None
        if use_div:
            loss_div = token_divergence_from_hidden(
                dcfg,
                pol.hidden,
                ref.hidden,
                pol.head,
                ref_head_weight=ref.head,
                output_embeddings=passes.output_embeddings(),
                cfg=dcfg,
                transform=passes.logit_transform,
            )
            self.check_finite(loss_div, f"divergence regulariser ({dcfg.name})")

        loss_entropy = kernel.entropy_penalty() if (train and use_kernel) else None

        steps = None
        beta_arg: float | torch.Tensor = beta
        if use_eps:
            perturbed = perturbed_token_logps(
                pol.hidden.detach(),
                ref.hidden,
                pol.head.detach(),
                batch.token_labels,
                epsilon_grid(lcfg.epsilon_dpo),
                ref_weight=ref.head,
                transform=passes.logit_transform,
            )
            steps = epsilon_dpo_steps_from_token_logps(perturbed, batch.token_seq, b)
            beta_arg = epsilon_dpo_beta_per_pair(beta, steps, lcfg.epsilon_dpo)

        # The objective (METHOD.md 2.5).
        out = hybrid_dpo_loss(
            pol.logps[:b],
            pol.logps[b:],
            ref_logps[:b],
            ref_logps[b:],
            beta=beta_arg,
            m_emb=m_emb,
            gamma=lcfg.gamma,
            label_smoothing=lcfg.label_smoothing,
            loss_div=loss_div,
            alpha=dcfg.alpha if loss_div is not None else 0.0,
            loss_entropy=loss_entropy,
        )
        for name in ("loss_pref", "loss_div", "loss_entropy", "loss"):
            value = getattr(out, name, None)
            if isinstance(value, torch.Tensor):
                self.check_finite(value, name)
        computed = batch.input_ids.numel()
        terms = StepTerms(
            out=out,
            n_tokens=batch.n_tokens,
            n_computed=computed,
            n_padding=computed - batch.n_positions,
            steps=steps,
            reps=reps,
        )
        if keep_hidden:
            terms.policy_hidden, terms.ref_hidden, terms.ref_logps = pol.hidden, ref.hidden, ref_logps
            terms.policy_head, terms.ref_head = pol.head, ref.head
        return terms

    # ------------------------------------------------------------------ one optimiser step
    def _mean_over_processes(self, totals: dict[str, float]) -> dict[str, float]:
        """Each process's step means, averaged over processes: every process has the same number of
        pairs, so this is the mean over the global batch (not rank 0's share alone)."""
        keys = list(totals)
        local = torch.tensor([totals[k] for k in keys], dtype=torch.float64, device=self.parts.device)
        mean = self.parts.accelerator.reduce(local, reduction="mean")
        return {k: float(v) for k, v in zip(keys, mean.tolist())}

    def run(self) -> dict[str, Any]:
        """One optimiser step over grad_accum micro-batches; returns the metrics.jsonl row."""
        opt, parts, state = self.config.optimisation, self.parts, self.state
        accelerator = parts.accelerator
        parts.model.train()
        t0 = time.perf_counter()
        # the step's metrics add up on the device (float64, in the order of the micro-batches) and are
        # read by the host once, after the update: no GPU->CPU wait inside the accumulation loop
        names = ("loss", "loss_pref", "loss_div", "loss_entropy", "reward_acc", "margin", "eps_step_sum")
        sums = torch.zeros(len(names), dtype=torch.float64, device=parts.device)
        step_count, tokens, computed, padding = 0, 0, 0, 0
        beta_now = state.beta
        for a in range(opt.grad_accum):
            batch = self.micro_batch(state.micro_index)
            state.micro_index += 1
            sync = a == opt.grad_accum - 1
            ctx = contextlib.nullcontext() if sync else accelerator.no_sync(parts.model)
            with ctx:
                terms = self.compute(batch, beta=beta_now, train=True)
                out = terms.out
                accelerator.backward(out.loss / opt.grad_accum)
            zero = sums.new_zeros(())
            micro = torch.stack(
                [
                    out.loss.detach().double() / opt.grad_accum,
                    out.loss_pref.detach().double() / opt.grad_accum,
                    (out.loss_div.detach().double() if out.loss_div is not None else zero) / opt.grad_accum,
                    (out.loss_entropy.detach().double() if out.loss_entropy is not None else zero) / opt.grad_accum,
                    (out.rho.detach() > 0).float().mean().double() / opt.grad_accum,
                    out.margins.detach().mean().double() / opt.grad_accum,
                    terms.steps.float().sum().double() if terms.steps is not None else zero,
                ]
            )
            sums += micro
            if terms.steps is not None:
                step_count += int(terms.steps.numel())
            tokens += terms.n_tokens
            computed += terms.n_computed
            padding += terms.n_padding
        self.raise_if_not_finite()
        values = dict(zip(names, sums.tolist()))
        step_sum = values.pop("eps_step_sum")
        totals = values
        if accelerator.num_processes > 1:
            totals = self._mean_over_processes(totals)
            counts = torch.tensor([tokens, computed, padding], device=parts.device)
            tokens, computed, padding = (int(c) for c in accelerator.reduce(counts, reduction="sum").tolist())
            for p in parts.kernel_params:  # kernel weights live outside DDP: average their gradients by hand
                if p.grad is not None:
                    p.grad = accelerator.reduce(p.grad, reduction="mean")
        params = [p for g in parts.optimizer.param_groups for p in g["params"]]
        grad_norm = accelerator.clip_grad_norm_(params, opt.max_grad_norm)
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        if math.isfinite(grad_norm):
            state.overflow_streak = 0
        elif fp16_overflow_tolerated(accelerator, state.overflow_streak):
            state.overflow_streak += 1  # the scaler skips this update and lowers its scale
        else:
            check_finite(torch.tensor(grad_norm), "gradient norm", self.config, self.state)
        lr = parts.scheduler.get_last_lr()[0]
        parts.optimizer.step()
        if not getattr(parts.optimizer, "step_was_skipped", False):  # fp16: no update, no schedule step (as HF's)
            parts.scheduler.step()
        parts.optimizer.zero_grad(set_to_none=True)
        eps = self.config.method.loss.epsilon_dpo
        if eps > 0 and step_count:
            stats = torch.tensor([step_sum, float(step_count)], device=parts.device)
            if accelerator.num_processes > 1:
                stats = accelerator.reduce(stats, reduction="sum")
            state.beta = update_beta(state.beta, float(stats[0] / stats[1]), eps)
        state.step += 1
        if parts.device.type == "cuda":  # the update's kernels are queued, not done: the step ends when they are
            torch.cuda.synchronize(parts.device)
        elapsed = time.perf_counter() - t0
        state.train_seconds += elapsed
        state.tokens_seen += tokens
        row = {
            "step": state.step,
            "epoch": state.micro_index / parts.batches_per_epoch,
            **totals,
            "beta": beta_now,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens / max(elapsed, 1e-9),
            "tokens": tokens,  # prompt + response tokens of the step's pairs, the prompt counted per response
            "computed_tokens": computed,  # positions the policy ran over (packed rows read a prompt once)
            "padding_tokens": padding,  # of those, padding
        }
        if parts.kernel is not None:
            row.update({k: float(v) for k, v in parts.kernel.weights().items()})
        return row
