"""The DPO-Kernels training loop (METHOD.md 2): torch + transformers + accelerate, CPU to multi-GPU.

One policy forward over chosen and rejected stacked gives log-probabilities and the final hidden
state (for the kernel term); one no-grad forward gives the reference (the base model with LoRA
adapters switched off, or a frozen copy for full fine-tuning). Everything a resumed run needs to
reproduce the uninterrupted one (weights, optimiser, schedule, RNG, kernel weights, beta, data
position) is checkpointed; the run directory grows live so pages can follow it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from dpo_engine.train import rundir
from dpo_engine.train.config import TrainConfig
from dpo_engine.train.data import Batch, check_pairs, collate, load_pairs, split_train_eval, tokenize_pairs
from dpo_engine.workspace import Workspace

logger = logging.getLogger("dpo_engine.train")

ProgressFn = Callable[[float, str], None]
StopFn = Callable[[], bool]
LogFn = Callable[[str], None]

CALIBRATED_KERNELS = ("spectral", "mahalanobis", "mixture", "hmk")


class TrainingDiverged(RuntimeError):
    """A loss term or the gradient became NaN/inf; the message says where and what to try."""


class TrainingOutOfMemory(RuntimeError):
    """The device ran out of memory; the message says which settings reduce it."""


OOM_ADVICE = (
    "out of memory: reduce optimisation.batch_size or data.max_length, raise optimisation.grad_accum to keep "
    "the effective batch, keep model.lora on, or turn on model.gradient_checkpointing"
)


@dataclass
class StepTerms:
    """Per-batch quantities shared by the training step and evaluation."""

    out: Any  # losses.LossOutput
    n_tokens: int
    policy_logits: torch.Tensor | None = None
    ref_logits: torch.Tensor | None = None
    loss_mask: torch.Tensor | None = None
    steps: torch.Tensor | None = None


@dataclass
class _State:
    step: int = 0
    micro_index: int = 0
    beta: float = 0.1
    tokens_seen: int = 0
    train_seconds: float = 0.0


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class DPOTrainer:
    """Set up once from a TrainConfig, then `run()`; writes everything into `run_dir`."""

    def __init__(
        self,
        config: TrainConfig,
        run_dir: str | Path,
        *,
        workspace: Workspace,
        pairs: pd.DataFrame | None = None,
        device: str | None = None,
        progress: ProgressFn | None = None,
        should_stop: StopFn | None = None,
        log: LogFn | None = None,
        progress_bar: bool = False,
    ) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.workspace = workspace
        self._pairs = pairs
        self._device_request = device
        self._progress = progress or (lambda f, m: None)
        self._should_stop = should_stop or (lambda: False)
        self._log_fn = log
        self._progress_bar = progress_bar
        self.state = _State(beta=config.method.loss.beta)

    # ------------------------------------------------------------------ logging
    def log(self, message: str) -> None:
        if self._log_fn is not None:
            self._log_fn(message)
        else:
            logger.info(message)

    # ------------------------------------------------------------------ setup
    def _make_accelerator(self):
        from accelerate import Accelerator

        from dpo_engine.models import resolve_dtype

        req = self._device_request
        cpu = req is not None and str(req).startswith("cpu")
        if req and str(req).startswith("cuda:") and torch.cuda.is_available():
            torch.cuda.set_device(torch.device(req))
        dtype = resolve_dtype(self.config.model.dtype, "cpu" if cpu or not torch.cuda.is_available() else "cuda")
        mixed = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=mixed)
        self.device = self.accelerator.device
        self.compute_dtype = dtype

    def _load_data(self) -> None:
        cfg = self.config.data
        df = self._pairs if self._pairs is not None else load_pairs(cfg.dataset, self.workspace, log=self.log)
        df = check_pairs(df)
        if cfg.max_pairs is not None:
            df = df.iloc[: cfg.max_pairs].reset_index(drop=True)
        self.pairs = df
        train_idx, eval_idx = split_train_eval(len(df), eval_fraction=cfg.eval_fraction,
                                               min_eval_pairs=cfg.min_eval_pairs, seed=self.config.optimisation.seed)
        tokenized = tokenize_pairs(self.tokenizer, df, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
        self.train_pairs = [tokenized[i] for i in train_idx]
        self.eval_pairs = [tokenized[i] for i in eval_idx]
        self.probe_pairs = self.eval_pairs[: self.config.monitoring.probe_pairs]
        opt = self.config.optimisation
        global_bs = opt.batch_size * self.accelerator.num_processes
        if len(self.train_pairs) < global_bs:
            raise ValueError(
                f"the training split has {len(self.train_pairs)} pairs, fewer than one batch of {global_bs}; "
                "lower optimisation.batch_size or data.eval_fraction, or use more pairs"
            )
        self.batches_per_epoch = len(self.train_pairs) // global_bs
        if opt.max_steps is not None:
            self.total_steps = opt.max_steps
        else:
            self.total_steps = max(1, math.ceil(opt.epochs * self.batches_per_epoch / opt.grad_accum))
        self.log(f"pairs: {len(df)} (train {len(self.train_pairs)}, eval {len(self.eval_pairs)}, "
                 f"probe {len(self.probe_pairs)}); steps: {self.total_steps}")

    def _load_model(self) -> None:
        from dpo_engine.models import load_policy

        mcfg = self.config.model
        load_dtype = torch.float32 if self.compute_dtype in (torch.bfloat16, torch.float16) else self.compute_dtype
        model, tokenizer = load_policy(mcfg.name, workspace=self.workspace, dtype=load_dtype, device="cpu",
                                       trust_remote_code=mcfg.trust_remote_code)
        self.tokenizer = tokenizer
        self.hidden_size = int(model.config.hidden_size)
        self.base_model = model
        self.htsr_before = None
        if self.config.monitoring.htsr and not self._resuming:
            self.htsr_before = self._htsr(model, rundir.HTSR_BEFORE, "before")
        if mcfg.lora:
            from peft import LoraConfig, get_peft_model

            torch.manual_seed(self.config.optimisation.seed)
            lcfg = LoraConfig(r=mcfg.lora_r, lora_alpha=mcfg.lora_alpha, lora_dropout=mcfg.lora_dropout,
                              target_modules=list(mcfg.lora_target_modules), task_type="CAUSAL_LM")
            try:
                model = get_peft_model(model, lcfg)
            except ValueError as exc:
                raise ValueError(f"LoRA could not attach to model {mcfg.name!r}: {exc} "
                                 "(set model.lora_target_modules to module names this model has)") from exc
            self.ref_model = None
        else:
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        if mcfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if mcfg.lora:
                model.enable_input_require_grads()
        model.config.use_cache = False
        self.model = model

    def _htsr(self, model, filename: str, label: str):
        if not self.accelerator.is_main_process:
            return None
        from dpo_engine.analysis.htsr import analyze_model, weighted_alpha

        t0 = time.perf_counter()
        table = analyze_model(model)
        table.to_csv(self.run_dir / filename, index=False)
        wa = weighted_alpha(table)
        self.log(f"HT-SR {label}: {len(table)} layers, weighted alpha {wa:.4f} ({time.perf_counter() - t0:.1f}s)")
        return wa

    # ------------------------------------------------------------------ representations
    def _project(self, h: torch.Tensor) -> torch.Tensor:
        h = F.normalize(h.float(), dim=-1)
        return F.normalize(h @ self.projection, dim=-1)

    def _pool(self, hidden: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from dpo_engine.losses import masked_mean_pool

        b = batch.n_pairs
        h_x = masked_mean_pool(hidden[:b], batch.prompt_mask[:b])
        h_c = masked_mean_pool(hidden[:b], batch.response_mask[:b])
        h_r = masked_mean_pool(hidden[b:], batch.response_mask[b:])
        return self._project(h_x), self._project(h_c), self._project(h_r)

    def _setup_method(self) -> None:
        from dpo_engine.kernels import KernelCalibration, build_kernel, random_orthogonal_projection

        mcfg = self.config.method
        self.encoder_reps: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        if mcfg.embedding_source == "encoder":
            self._embed_with_encoder()
            dim_in = self.encoder_dim
        else:
            dim_in = self.hidden_size
        self.k = min(dim_in, mcfg.projection_dim)
        self.projection = random_orthogonal_projection(dim_in, self.k, self.config.optimisation.seed).float().to(self.device)
        kcfg = mcfg.kernel
        self.calibration = None
        if kcfg.name in CALIBRATED_KERNELS:
            cal_path = self.run_dir / rundir.CALIBRATION
            if cal_path.is_file():
                self.calibration = KernelCalibration.load(cal_path)
            else:
                reps = self._calibration_reps()
                self.calibration = KernelCalibration.fit(reps, spectral_components=kcfg.spectral_components)
                if self.accelerator.is_main_process:
                    self.calibration.save(cal_path)
                self.log(f"kernel calibration: {reps.shape[0]} vectors of dim {reps.shape[1]}")
        kernel = build_kernel(kcfg, self.calibration) if kcfg.name != "none" else None
        self.kernel = kernel.to(self.device) if kernel is not None else None

    def _embed_with_encoder(self) -> None:
        from dpo_engine.embed import embed_texts

        df = self.pairs
        texts = list(df["prompt"].astype(str)) + list(df["chosen"].astype(str)) + list(df["rejected"].astype(str))
        emb = torch.as_tensor(np.asarray(embed_texts(texts)), dtype=torch.float32)
        n = len(df)
        self.encoder_dim = emb.shape[1]
        self.encoder_reps = {pid: (emb[i], emb[n + i], emb[2 * n + i]) for i, pid in enumerate(df["pair_id"])}

    def _encoder_batch(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = [self.encoder_reps[p] for p in batch.pair_ids]
        stack = [torch.stack([r[j] for r in rows]).to(self.device) for j in range(3)]
        return self._project(stack[0]), self._project(stack[1]), self._project(stack[2])

    @torch.no_grad()
    def _calibration_reps(self) -> torch.Tensor:
        pairs = self.train_pairs[: self.config.method.calibration_pairs]
        chunks = []
        bs = self.config.optimisation.batch_size
        for i in range(0, len(pairs), bs):
            batch = collate(pairs[i : i + bs], self.tokenizer.pad_token_id).to(self.device)
            if self.encoder_reps is not None:
                h_x, h_c, h_r = self._encoder_batch(batch)
            else:
                with self._reference_context():
                    _, hidden = self._forward(self._reference_model(), batch, hidden=True)
                h_x, h_c, h_r = self._pool(hidden, batch)
            chunks.append(torch.cat([h_x, h_c, h_r]).cpu())
        return torch.cat(chunks)

    # ------------------------------------------------------------------ forward passes
    def _unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def _reference_model(self):
        return self.ref_model if self.ref_model is not None else self._unwrapped()

    def _reference_context(self):
        if self.ref_model is not None:
            return contextlib.nullcontext()
        return self._unwrapped().disable_adapter()

    def _forward(self, model, batch: Batch, *, hidden: bool):
        with self.accelerator.autocast():
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(),
                        output_hidden_states=hidden, use_cache=False)
        logits = out.logits[:, :-1].float()
        return logits, (out.hidden_states[-1] if hidden else None)

    def _compute(self, batch: Batch, *, beta: float, train: bool, keep_logits: bool = False) -> StepTerms:
        """Loss terms for one batch (METHOD.md 2.1-2.7)."""
        from dpo_engine.divergences import token_divergence
        from dpo_engine.losses import (embedding_margin, epsilon_dpo_beta_per_pair, epsilon_dpo_steps,
                                       hybrid_dpo_loss, sequence_logps)

        mcfg = self.config.method
        lcfg = mcfg.loss
        b = batch.n_pairs
        labels = batch.input_ids[:, 1:]
        lmask = batch.response_mask[:, 1:]
        use_kernel = self.kernel is not None and lcfg.gamma > 0
        need_hidden = use_kernel and self.encoder_reps is None

        logits, hidden = self._forward(self.model, batch, hidden=need_hidden)
        with torch.no_grad(), self._reference_context():
            ref_logits, _ = self._forward(self._reference_model(), batch, hidden=False)
        logps = sequence_logps(logits, labels, lmask)
        ref_logps = sequence_logps(ref_logits, labels, lmask)
        self._check_finite(logps, "policy log-probabilities")

        m_emb = None
        if use_kernel:
            h = self._encoder_batch(batch) if self.encoder_reps is not None else self._pool(hidden, batch)
            m_emb = embedding_margin(self.kernel, *h)
            self._check_finite(m_emb, "embedding margin (kernel term)")

        dcfg = mcfg.divergence
        loss_div = None
        if train and dcfg.name != "none" and dcfg.alpha > 0:
            loss_div = token_divergence(dcfg, logits, ref_logits, lmask,
                                        output_embeddings=self._output_embeddings(), cfg=dcfg)
            self._check_finite(loss_div, f"divergence regulariser ({dcfg.name})")

        loss_entropy = self.kernel.entropy_penalty() if (train and use_kernel) else None

        steps = None
        beta_arg: float | torch.Tensor = beta
        if train and lcfg.epsilon_dpo > 0:
            with torch.no_grad():
                steps = epsilon_dpo_steps(logits[:b], ref_logits[:b], labels[:b], lmask[:b],
                                          logits[b:], ref_logits[b:], labels[b:], lmask[b:], lcfg.epsilon_dpo)
            beta_arg = epsilon_dpo_beta_per_pair(beta, steps, lcfg.epsilon_dpo)

        out = hybrid_dpo_loss(logps[:b], logps[b:], ref_logps[:b], ref_logps[b:], beta=beta_arg, m_emb=m_emb,
                              gamma=lcfg.gamma, label_smoothing=lcfg.label_smoothing, loss_div=loss_div,
                              alpha=dcfg.alpha if loss_div is not None else 0.0, loss_entropy=loss_entropy)
        for name in ("loss_pref", "loss_div", "loss_entropy", "loss"):
            value = getattr(out, name, None)
            if isinstance(value, torch.Tensor):
                self._check_finite(value, name)
        terms = StepTerms(out=out, n_tokens=int(batch.attention_mask.sum()), steps=steps)
        if keep_logits:
            terms.policy_logits, terms.ref_logits, terms.loss_mask = logits, ref_logits, lmask
        return terms

    def _output_embeddings(self) -> torch.Tensor:
        return self._unwrapped().get_output_embeddings().weight

    def _check_finite(self, value: torch.Tensor, term: str) -> None:
        if not bool(torch.isfinite(value.detach()).all()):
            opt = self.config.optimisation
            raise TrainingDiverged(
                f"training diverged at step {self.state.step + 1}: {term} is not finite (NaN or inf). "
                f"Try a lower learning rate (now {opt.lr:g}), model.dtype float32 (now {self.config.model.dtype}), "
                f"or a smaller beta (now {self.state.beta:g})"
                + (f", or a smaller divergence alpha (now {self.config.method.divergence.alpha:g})"
                   if "divergence" in term else "")
            )

    # ------------------------------------------------------------------ data order
    def _micro_batch(self, micro_index: int) -> Batch:
        """Micro-batch number `micro_index` of this process: a pure function of seed and index (exact resume)."""
        opt = self.config.optimisation
        epoch, pos = divmod(micro_index, self.batches_per_epoch)
        perm = np.random.default_rng([opt.seed, epoch]).permutation(len(self.train_pairs))
        nproc, rank = self.accelerator.num_processes, self.accelerator.process_index
        start = (pos * nproc + rank) * opt.batch_size
        chosen = [self.train_pairs[i] for i in perm[start : start + opt.batch_size]]
        return collate(chosen, self.tokenizer.pad_token_id).to(self.device)

    # ------------------------------------------------------------------ optimiser
    def _build_optimiser(self) -> None:
        from transformers import get_scheduler

        opt = self.config.optimisation
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": params, "lr": opt.lr, "weight_decay": opt.weight_decay}]
        self.kernel_params = self.kernel.mixture_parameters() if self.kernel is not None else []
        if self.kernel_params:
            groups.append({"params": self.kernel_params, "lr": self.config.method.kernel.weight_lr, "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(groups)
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        name = "constant_with_warmup" if opt.scheduler == "constant" else opt.scheduler
        self.scheduler = get_scheduler(name, self.optimizer, num_warmup_steps=math.ceil(opt.warmup_ratio * self.total_steps),
                                       num_training_steps=self.total_steps)

    # ------------------------------------------------------------------ checkpoints
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self._unwrapped().named_parameters() if p.requires_grad}

    def _save_checkpoint(self) -> None:
        if not self.accelerator.is_main_process:
            return
        final = rundir.checkpoint_dir(self.run_dir, self.state.step)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(self._trainable_state(), tmp / "weights.pt")
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
        if self.kernel is not None:
            torch.save(self.kernel.state_dict(), tmp / "kernel.pt")
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        torch.save({"step": self.state.step, "micro_index": self.state.micro_index, "beta": self.state.beta,
                    "tokens_seen": self.state.tokens_seen, "train_seconds": self.state.train_seconds,
                    "rng": rng}, tmp / "state.pt")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for older in (self.run_dir / rundir.CHECKPOINTS).iterdir():  # keep only the newest complete checkpoint
            if older != final and older.name.startswith("step_"):
                shutil.rmtree(older, ignore_errors=True)
        self.log(f"checkpoint saved: {final.relative_to(self.run_dir)}")

    def _load_checkpoint(self, path: Path) -> None:
        weights = torch.load(path / "weights.pt", map_location="cpu")
        named = dict(self._unwrapped().named_parameters())
        missing = [n for n in weights if n not in named]
        if missing:
            raise ValueError(f"checkpoint {path} does not match this model/config (unknown parameters: {missing[:3]})")
        with torch.no_grad():
            for n, t in weights.items():
                named[n].copy_(t.to(named[n].device))
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        if self.kernel is not None and (path / "kernel.pt").is_file():
            self.kernel.load_state_dict(torch.load(path / "kernel.pt", map_location=self.device))
        st = torch.load(path / "state.pt", weights_only=False)
        self.state.step, self.state.micro_index, self.state.beta = st["step"], st["micro_index"], st["beta"]
        self.state.tokens_seen, self.state.train_seconds = st["tokens_seen"], st["train_seconds"]
        torch.set_rng_state(st["rng"]["torch"])
        np.random.set_state(st["rng"]["numpy"])
        random.setstate(st["rng"]["python"])
        if st["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["rng"]["cuda"])
        step = self.state.step
        rundir.truncate_jsonl_after_step(self.run_dir / rundir.METRICS, step)
        rundir.truncate_jsonl_after_step(self.run_dir / rundir.EVAL, step)
        for s in rundir.list_snapshots(self.run_dir):
            if s > step:
                rundir.snapshot_path(self.run_dir, s).unlink(missing_ok=True)
        self.log(f"resumed from {path.relative_to(self.run_dir)} (step {step}, beta {self.state.beta:g})")

    # ------------------------------------------------------------------ evaluation and snapshots
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        from dpo_engine.divergences import all_token_divergences

        self.model.eval()
        bs = self.config.optimisation.batch_size
        n = 0
        sums: dict[str, float] = {"loss_pref": 0.0, "reward_acc": 0.0, "hybrid_acc": 0.0,
                                  "reward_chosen": 0.0, "reward_rejected": 0.0}
        div_sums: dict[str, float] = {}
        positions = 0
        for i in range(0, len(self.eval_pairs), bs):
            batch = collate(self.eval_pairs[i : i + bs], self.tokenizer.pad_token_id).to(self.device)
            terms = self._compute(batch, beta=self.state.beta, train=False, keep_logits=True)
            out, b = terms.out, batch.n_pairs
            sums["loss_pref"] += float(out.loss_pref) * b
            sums["reward_acc"] += float((out.rho > 0).float().sum())
            sums["hybrid_acc"] += float((out.margins > 0).float().sum())
            sums["reward_chosen"] += float(out.reward_chosen.sum())
            sums["reward_rejected"] += float(out.reward_rejected.sum())
            n += b
            n_pos = int(terms.loss_mask.sum())
            if self.config.monitoring.eval_divergences:
                divs = all_token_divergences(terms.policy_logits, terms.ref_logits, terms.loss_mask,
                                             self.config.method.divergence, self._output_embeddings())
            else:
                divs = {key: float("nan") for key in rundir.EVAL_KEYS if key.startswith("div_")}
            for key, value in divs.items():
                div_sums[key] = div_sums.get(key, 0.0) + float(value) * n_pos
            positions += n_pos
        row = {k: v / n for k, v in sums.items()}
        row.update({k: v / max(positions, 1) for k, v in div_sums.items()})
        return row

    @torch.no_grad()
    def snapshot(self) -> float:
        """Store probe-set h(y+), h(y-) under the current policy; return their Davies-Bouldin score."""
        from dpo_engine.analysis.dbs import davies_bouldin

        self.model.eval()
        chosen, rejected = [], []
        bs = self.config.optimisation.batch_size
        for i in range(0, len(self.probe_pairs), bs):
            batch = collate(self.probe_pairs[i : i + bs], self.tokenizer.pad_token_id).to(self.device)
            _, hidden = self._forward(self.model, batch, hidden=True)
            _, h_c, h_r = self._pool(hidden, batch)
            chosen.append(h_c.cpu().numpy())
            rejected.append(h_r.cpu().numpy())
        c = np.concatenate(chosen).astype(np.float16)
        r = np.concatenate(rejected).astype(np.float16)
        if self.accelerator.is_main_process:
            rundir.write_snapshot(self.run_dir, self.state.step, c, r, [p.pair_id for p in self.probe_pairs])
        return davies_bouldin(c, r)

    def _monitor(self, final: bool = False) -> None:
        mon = self.config.monitoring
        step = self.state.step
        do_eval = final or step == 0 or step % mon.eval_every == 0
        do_snap = final or step == 0 or step % mon.snapshot_every == 0
        if not (do_eval or do_snap):
            return
        if final and rundir.read_jsonl(self.run_dir / rundir.EVAL)[-1:] and \
                rundir.read_jsonl(self.run_dir / rundir.EVAL)[-1].get("step") == step:
            return  # the last step already coincided with an eval
        row: dict[str, Any] = {"step": step}
        row.update(self.evaluate())
        if do_snap:
            row["dbs"] = self.snapshot()
        if self.accelerator.is_main_process:
            rundir.append_jsonl(self.run_dir / rundir.EVAL, row)
        self.log(f"eval step {step}: loss_pref {row['loss_pref']:.4f} reward_acc {row['reward_acc']:.3f}"
                 + (f" dbs {row['dbs']:.3f}" if "dbs" in row else ""))

    # ------------------------------------------------------------------ training step
    def _train_step(self) -> dict[str, Any]:
        opt = self.config.optimisation
        self.model.train()
        t0 = time.perf_counter()
        totals = {"loss": 0.0, "loss_pref": 0.0, "loss_div": 0.0, "loss_entropy": 0.0, "reward_acc": 0.0, "margin": 0.0}
        step_sum, step_count, tokens = 0.0, 0, 0
        beta_now = self.state.beta
        for a in range(opt.grad_accum):
            batch = self._micro_batch(self.state.micro_index)
            self.state.micro_index += 1
            sync = a == opt.grad_accum - 1
            ctx = contextlib.nullcontext() if sync else self.accelerator.no_sync(self.model)
            with ctx:
                terms = self._compute(batch, beta=beta_now, train=True)
                out = terms.out
                self.accelerator.backward(out.loss / opt.grad_accum)
            totals["loss"] += float(out.loss.detach()) / opt.grad_accum
            totals["loss_pref"] += float(out.loss_pref) / opt.grad_accum
            totals["loss_div"] += (float(out.loss_div) if out.loss_div is not None else 0.0) / opt.grad_accum
            totals["loss_entropy"] += (float(out.loss_entropy) if out.loss_entropy is not None else 0.0) / opt.grad_accum
            totals["reward_acc"] += float((out.rho > 0).float().mean()) / opt.grad_accum
            totals["margin"] += float(out.margins.mean()) / opt.grad_accum
            if terms.steps is not None:
                step_sum += float(terms.steps.float().sum())
                step_count += int(terms.steps.numel())
            tokens += terms.n_tokens
        if self.accelerator.num_processes > 1:
            for p in self.kernel_params:  # kernel weights live outside DDP: average their gradients by hand
                if p.grad is not None:
                    p.grad = self.accelerator.reduce(p.grad, reduction="mean")
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = self.accelerator.clip_grad_norm_(params, opt.max_grad_norm)
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        if not math.isfinite(grad_norm):
            self._check_finite(torch.tensor(grad_norm), "gradient norm")
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        eps = self.config.method.loss.epsilon_dpo
        if eps > 0 and step_count:
            from dpo_engine.losses import update_beta

            stats = torch.tensor([step_sum, float(step_count)], device=self.device)
            if self.accelerator.num_processes > 1:
                stats = self.accelerator.reduce(stats, reduction="sum")
            self.state.beta = update_beta(self.state.beta, float(stats[0] / stats[1]), eps)
        self.state.step += 1
        elapsed = time.perf_counter() - t0
        self.state.train_seconds += elapsed
        self.state.tokens_seen += tokens
        row = {"step": self.state.step, "epoch": self.state.micro_index / self.batches_per_epoch, **totals,
               "beta": beta_now, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens / max(elapsed, 1e-9)}
        if self.kernel is not None:
            row.update({k: float(v) for k, v in self.kernel.weights().items()})
        return row

    # ------------------------------------------------------------------ the run
    def setup(self) -> None:
        """Everything before the first step: device, model(s), data split, calibration, kernel, optimiser."""
        self._resuming = rundir.latest_checkpoint(self.run_dir) is not None
        self._make_accelerator()
        if self.accelerator.is_main_process:
            rundir.write_json(self.run_dir / rundir.CONFIG, self.config.resolved())
        torch.manual_seed(self.config.optimisation.seed)
        self._load_model()
        self._load_data()
        self.model.to(self.device)
        if self.ref_model is not None:
            self.ref_model.to(self.device)
        self._setup_method()
        self._build_optimiser()

    def run(self) -> dict[str, Any]:
        t_start = time.perf_counter()
        summary: dict[str, Any] = {"status": "running", "error": None}
        self.htsr_before = None
        try:
            self.setup()
            ckpt = rundir.latest_checkpoint(self.run_dir)
            if ckpt is not None:
                self._load_checkpoint(ckpt)
            else:
                for stale in (rundir.METRICS, rundir.EVAL):
                    (self.run_dir / stale).unlink(missing_ok=True)
                torch.manual_seed(self.config.optimisation.seed)
                self._monitor()
            status = self._loop()
            summary["status"] = status
            if status == "succeeded":
                self._monitor(final=True)
                self._finish()
        except TrainingDiverged as exc:
            summary.update(status="failed", error=str(exc))
        except Exception as exc:  # noqa: BLE001 - recorded in summary.json, then re-raised below
            if _is_oom(exc):
                summary.update(status="failed", error=f"{OOM_ADVICE} ({type(exc).__name__}: {exc})"[:2000])
            else:
                summary.update(status="failed", error=f"{type(exc).__name__}: {exc}")
                self._write_summary(summary, t_start)
                raise
        self._write_summary(summary, t_start)
        return summary

    def _loop(self) -> str:
        mon = self.config.monitoring
        bar = None
        if self._progress_bar and self.accelerator.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.state.step, desc="train", unit="step")
        try:
            while self.state.step < self.total_steps:
                if self._should_stop():
                    self.log(f"cancelled at step {self.state.step}")
                    return "cancelled"
                row = self._train_step()
                step = self.state.step
                if self.accelerator.is_main_process and (step % mon.log_every == 0 or step == self.total_steps):
                    rundir.append_jsonl(self.run_dir / rundir.METRICS, row)
                message = f"step {step}/{self.total_steps} loss {row['loss']:.4f} acc {row['reward_acc']:.2f}"
                self._progress(step / self.total_steps, message)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['reward_acc']:.2f}")
                if step < self.total_steps:
                    self._monitor()
                if step % mon.checkpoint_every == 0 or step == self.total_steps:
                    self._save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
        return "succeeded"

    def _finish(self) -> None:
        if not self.accelerator.is_main_process:
            return
        model = self._unwrapped()
        out_dir = self.run_dir / rundir.MODEL
        model.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)
        self.log(f"model saved: {out_dir.relative_to(self.run_dir)} ({'LoRA adapter' if self.config.model.lora else 'full model'})")
        self.htsr_after = None
        if self.config.monitoring.htsr:
            merged = model.merge_and_unload() if self.config.model.lora else model
            self.htsr_after = self._htsr(merged, rundir.HTSR_AFTER, "after")

    def _write_summary(self, summary: dict[str, Any], t_start: float) -> None:
        if hasattr(self, "accelerator") and not self.accelerator.is_main_process:
            return
        metrics = rundir.read_jsonl(self.run_dir / rundir.METRICS)
        evals = rundir.read_jsonl(self.run_dir / rundir.EVAL)
        device = getattr(self, "device", torch.device("cpu"))
        before = getattr(self, "htsr_before", None)
        if before is None:
            prev = rundir.read_htsr(self.run_dir, "before")
            if prev is not None:
                from dpo_engine.analysis.htsr import weighted_alpha

                before = weighted_alpha(prev)
        summary.update(
            steps_completed=self.state.step,
            total_steps=getattr(self, "total_steps", None),
            final_metrics=metrics[-1] if metrics else None,
            final_eval=evals[-1] if evals else None,
            wall_time_s=time.perf_counter() - t_start,
            train_time_s=self.state.train_seconds,
            tokens_per_s=self.state.tokens_seen / self.state.train_seconds if self.state.train_seconds else None,
            peak_memory_mb=peak_memory_mb(device),
            device=str(device),
            weighted_alpha_before=before,
            weighted_alpha_after=getattr(self, "htsr_after", None),
            final_beta=self.state.beta,
        )
        if summary.get("error"):
            self.log(f"error: {summary['error']}")
        rundir.write_json(self.run_dir / rundir.SUMMARY, summary)


def train(config: TrainConfig, run_dir: str | Path, *, workspace: Workspace, **kwargs: Any) -> dict[str, Any]:
    """Train (or resume) into run_dir and return summary.json's content."""
    return DPOTrainer(config, run_dir, workspace=workspace, **kwargs).run()
