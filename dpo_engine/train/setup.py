"""Everything before the first training step: device, model(s), data split, method (kernel), optimiser.

Read top to bottom in the order `setup()` calls them: the accelerator picks the device and precision,
the policy is loaded (with LoRA adapters, or beside a frozen reference copy), the pairs are tokenised
and split, the kernel is calibrated on reference representations, and the optimiser gets one
parameter group for the model and one for the kernel's mixture weights. The trainer mixes this
class in.
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch

from dpo_engine import rundir
from dpo_engine.data.tokenize import pair_length, tokenize_pairs
from dpo_engine.train.data import check_pairs, load_pairs, split_train_eval
from dpo_engine.train.reference import ReferenceCache, model_key

CALIBRATED_KERNELS = ("spectral", "mahalanobis", "mixture", "hmk")


class TrainingSetup:
    """Builds the objects the step and monitoring use; mixed into DPOTrainer."""

    def setup(self) -> None:
        """Everything before the first step: device, model(s), data split, calibration, kernel, optimiser."""
        self._resuming = rundir.latest_checkpoint(self.run_dir) is not None
        self._make_accelerator()
        if self.accelerator.is_main_process:
            rundir.write_json(self.run_dir / rundir.CONFIG, self.config.resolved())
        torch.manual_seed(self.config.optimisation.seed)
        with self.accelerator.main_process_first():  # rank 0 fills the workspace's model and data caches first
            self._load_model()
            self._load_data()
        self.model.to(self.device)
        if self.ref_model is not None:
            self.ref_model.to(self.device)
        self._setup_method()
        self._build_optimiser()

    # ------------------------------------------------------------------ device
    def _make_accelerator(self) -> None:
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

    # ------------------------------------------------------------------ models
    def _load_model(self) -> None:
        from dpo_engine.models import load_policy

        mcfg = self.config.model
        load_dtype = torch.float32 if self.compute_dtype in (torch.bfloat16, torch.float16) else self.compute_dtype
        model, tokenizer = load_policy(
            mcfg.name,
            workspace=self.workspace,
            dtype=load_dtype,
            device="cpu",
            trust_remote_code=mcfg.trust_remote_code,
        )
        self.tokenizer = tokenizer
        self.hidden_size = int(model.config.hidden_size)
        self.base_model = model
        # Keyed on the weights before any adapter is attached: the reference model, and the "before" model.
        key = model_key(model, self.compute_dtype, self.device)
        self.htsr_before = None
        if self.config.monitoring.htsr and not self._resuming:
            self.htsr_before = self._htsr_before(model, key)
        self.reference_cache = None
        if self.config.optimisation.reference_cache:
            self.reference_cache = ReferenceCache(self.workspace.root, key)
            self.log(f"reference cache: {self.reference_cache.count()} pair(s) known for this model")
        if mcfg.lora:
            from peft import LoraConfig, get_peft_model

            torch.manual_seed(self.config.optimisation.seed)
            lcfg = LoraConfig(
                r=mcfg.lora_r,
                lora_alpha=mcfg.lora_alpha,
                lora_dropout=mcfg.lora_dropout,
                target_modules=list(mcfg.lora_target_modules),
                task_type="CAUSAL_LM",
            )
            try:
                model = get_peft_model(model, lcfg)
            except ValueError as exc:
                raise ValueError(
                    f"LoRA could not attach to model {mcfg.name!r}: {exc} "
                    "(set model.lora_target_modules to module names this model has)"
                ) from exc
            self.ref_model = None
        else:
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        if mcfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if mcfg.lora:
                model.enable_input_require_grads()
        model.config.use_cache = False
        self.model = model

    # ------------------------------------------------------------------ data
    def _load_data(self) -> None:
        cfg = self.config.data
        df = self._pairs if self._pairs is not None else load_pairs(cfg.dataset, self.workspace, log=self.log)
        df = check_pairs(df)
        if cfg.max_pairs is not None:
            df = df.iloc[: cfg.max_pairs].reset_index(drop=True)
        self.pairs = df
        train_idx, eval_idx = split_train_eval(
            len(df),
            eval_fraction=cfg.eval_fraction,
            min_eval_pairs=cfg.min_eval_pairs,
            seed=self.config.optimisation.seed if cfg.split_seed is None else cfg.split_seed,
        )
        tokenized = tokenize_pairs(
            self.tokenizer, df, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length
        )
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
        self.log(
            f"pairs: {len(df)} (train {len(self.train_pairs)}, eval {len(self.eval_pairs)}, "
            f"probe {len(self.probe_pairs)}); steps: {self.total_steps}"
        )

    # ------------------------------------------------------------------ method: projection, kernel
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
        self.projection = (
            random_orthogonal_projection(dim_in, self.k, self.config.optimisation.seed).float().to(self.device)
        )
        kcfg = mcfg.kernel
        self.calibration = None
        if kcfg.name in CALIBRATED_KERNELS:
            cal_path = self.run_dir / rundir.CALIBRATION
            self.accelerator.wait_for_everyone()  # every process sees the same file state (rank 0 writes it below)
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

    @torch.no_grad()
    def _calibration_reps(self) -> torch.Tensor:
        """Projected reference representations of the first calibration_pairs training pairs (3 per pair).

        The pooled reference hidden states are cached with the log-probs, so a later run on the same
        data skips this pass; computing them also fills the log-probs of these pairs."""
        pairs = self.train_pairs[: self.config.method.calibration_pairs]
        bs = self.config.optimisation.batch_size
        if self.encoder_reps is not None:
            chunks = [
                torch.cat(self._encoder_batch(self._collate(pairs[i : i + bs]))).cpu() for i in range(0, len(pairs), bs)
            ]
            return torch.cat(chunks)
        cache = self.reference_cache if self.reference_cache is not None else ReferenceCache(None, "run")
        todo = sorted(cache.missing("reps", pairs), key=pair_length)  # similar lengths batched: less padding
        t0, done = time.perf_counter(), 0
        for i in range(0, len(todo), bs):
            chunk = todo[i : i + bs]
            ref = self._reference_pass(self._collate(chunk), pool=True)
            if cache is not self.reference_cache:  # no workspace cache: keep this run's values in memory
                cache.put("reps", chunk, torch.stack(ref.pooled, dim=1).float().cpu().numpy())
            done += len(chunk)
            if done == len(todo) or (i // bs) % 10 == 9:
                self.log(f"reference pass for calibration: {done}/{len(todo)} pairs ({time.perf_counter() - t0:.0f}s)")
        cache.save()
        pooled = torch.from_numpy(cache.get("reps", pairs)).to(self.device)  # B × 3 × H
        return torch.cat([self._project(pooled[:, j]) for j in range(3)]).cpu()

    # ------------------------------------------------------------------ optimiser
    def _build_optimiser(self) -> None:
        from transformers import get_scheduler

        opt = self.config.optimisation
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": params, "lr": opt.lr, "weight_decay": opt.weight_decay}]
        self.kernel_params = self.kernel.mixture_parameters() if self.kernel is not None else []
        if self.kernel_params:
            groups.append(
                {"params": self.kernel_params, "lr": self.config.method.kernel.weight_lr, "weight_decay": 0.0}
            )
        self.optimizer = torch.optim.AdamW(groups)
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        name = "constant_with_warmup" if opt.scheduler == "constant" else opt.scheduler
        self.scheduler = get_scheduler(
            name,
            self.optimizer,
            num_warmup_steps=math.ceil(opt.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps,
        )
