"""The training step (METHOD.md 2): which batch comes next, the forward passes, the objective, the update.

Read top to bottom: `_micro_batch` picks the pairs (a pure function of seed and index, so a resumed
run sees the same batches), `_forward` runs the model, `_compute` turns one batch into the loss terms
(preference, kernel margin, divergence, entropy, ε-DPO steps), and `_train_step` accumulates, clips,
steps the optimiser and returns the metrics.jsonl row. Three things keep the step lean: pairs are
packed so the shared prompt is computed once (data.collate_packed), the LM head runs on response
tokens only, and the reference's log-probs come from the workspace cache (reference.py) whenever
the objective needs nothing else from the reference. Before the first update the policy computes
exactly what the reference computes, so an evaluation at step 0 takes the reference's outputs (from
the cache when it has them) instead of running both. No (tokens × vocabulary) tensor outlives a chunk:
passes keep the final hidden states at the response tokens, and log-probs, divergences and ε-DPO's
perturbed policies form logits from them a few rows at a time (lm_head.py). The trainer mixes this class in; the objects
it uses (model, kernel, optimiser, state) are built by `setup.TrainingSetup`.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dpo_engine.data.tokenize import TokenizedPair
from dpo_engine.divergences import token_divergence_from_hidden
from dpo_engine.lm_head import head_token_logps, perturbed_token_logps
from dpo_engine.losses import (
    embedding_margin,
    epsilon_dpo_beta_per_pair,
    epsilon_dpo_steps_from_token_logps,
    epsilon_grid,
    hybrid_dpo_loss,
    masked_mean_pool,
    sum_by_sequence,
    update_beta,
)
from dpo_engine.train.data import Batch, collate, collate_packed


class TrainingDiverged(RuntimeError):
    """A loss term or the gradient became NaN/inf; the message says where and what to try."""


@dataclass
class StepTerms:
    """Per-batch quantities shared by the training step and evaluation."""

    out: Any  # losses.LossOutput
    n_tokens: int
    policy_hidden: torch.Tensor | None = None  # (N × H) final hidden states at the batch's response tokens
    ref_hidden: torch.Tensor | None = None
    policy_head: torch.Tensor | None = None  # (V × H) the LM head weights that turn them into logits
    ref_head: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    steps: torch.Tensor | None = None
    reps: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # projected h(x), h(y+), h(y-)


@dataclass
class ForwardOut:
    """One model pass over a batch: sequence log-probs, pooled and response-token hidden states."""

    logps: torch.Tensor  # (2B,) chosen then rejected
    pooled: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # masked means of the last hidden state (B × H)
    hidden: torch.Tensor | None = None  # (N × H) final hidden states at the response tokens; None from the cache
    head: torch.Tensor | None = None  # (V × H) the model's LM head weight: logits = head @ hidden


@dataclass
class TrainState:
    """Everything about progress that a checkpoint must restore."""

    step: int = 0
    micro_index: int = 0
    beta: float = 0.1
    tokens_seen: int = 0
    train_seconds: float = 0.0


class TrainingStep:
    """Forward, objective and backward; mixed into DPOTrainer."""

    # ------------------------------------------------------------------ data order
    def _collate(self, pairs: list[TokenizedPair]) -> Batch:
        """The batch layout the config asks for: packed pairs (prompt once) or separate rows."""
        build = collate_packed if self.config.optimisation.pack_pairs else collate
        return build(pairs, self.tokenizer.pad_token_id).to(self.device)

    def _micro_batch(self, micro_index: int) -> Batch:
        """Micro-batch number `micro_index` of this process: a pure function of seed and index (exact resume)."""
        opt = self.config.optimisation
        epoch, pos = divmod(micro_index, self.batches_per_epoch)
        perm = np.random.default_rng([opt.seed, epoch]).permutation(len(self.train_pairs))
        nproc, rank = self.accelerator.num_processes, self.accelerator.process_index
        start = (pos * nproc + rank) * opt.batch_size
        return self._collate([self.train_pairs[i] for i in perm[start : start + opt.batch_size]])

    # ------------------------------------------------------------------ models
    def _unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def _reference_model(self):
        return self.ref_model if self.ref_model is not None else self._unwrapped()

    def _reference_context(self):
        """The reference is the base model with LoRA adapters off, or a frozen copy for full fine-tuning."""
        if self.ref_model is not None:
            return contextlib.nullcontext()
        return self._unwrapped().disable_adapter()

    def _head_weight(self, model) -> torch.Tensor:
        """The model's LM head weight W (V × H): logits are W h, formed a chunk of rows at a time."""
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        if not isinstance(head, torch.nn.Linear) or head.bias is not None:
            raise ValueError(
                f"the LM head ({type(head).__name__}) must be a plain linear layer without a bias; "
                "leave it out of model.lora_target_modules"
            )
        return head.weight

    def _output_embeddings(self) -> torch.Tensor:
        return self._head_weight(self.model)

    # ------------------------------------------------------------------ representations
    def _project(self, h: torch.Tensor) -> torch.Tensor:
        h = F.normalize(h.float(), dim=-1)
        return F.normalize(h @ self.projection, dim=-1)

    def _encoder_batch(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = [self.encoder_reps[p] for p in batch.pair_ids]
        stack = [torch.stack([r[j] for r in rows]).to(self.device) for j in range(3)]
        return self._project(stack[0]), self._project(stack[1]), self._project(stack[2])

    # ------------------------------------------------------------------ forward and objective
    def _forward(self, model, batch: Batch, *, pool: bool) -> ForwardOut:
        """One pass; the LM head runs on the response tokens only (prompt and padding logits are never
        formed), a chunk of rows at a time, and log-probs come from a gather and a logsumexp."""
        inner = self.accelerator.unwrap_model(model)
        mask = batch.attention_mask
        if mask.ndim == 2:
            mask = mask.long()
        elif getattr(inner.config, "_attn_implementation", "sdpa") == "eager":  # eager adds the mask to the scores
            mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(
                ~mask, torch.finfo(torch.float32).min
            )
        with self.accelerator.autocast():
            out = model(
                input_ids=batch.input_ids,
                attention_mask=mask,
                position_ids=batch.position_ids,
                output_hidden_states=True,
                use_cache=False,
                logits_to_keep=1,
            )
            hidden = out.hidden_states[-1]
            tokens = hidden[batch.token_rows, batch.token_cols]
            head = self._head_weight(inner)
            token_values = head_token_logps(tokens, head, batch.token_labels)
        logps = sum_by_sequence(token_values, batch.token_seq, 2 * batch.n_pairs)
        pooled = None
        if pool:
            pooled = tuple(masked_mean_pool(hidden[rows], m) for rows, m in zip(batch.pool_rows, batch.pool_masks))
        return ForwardOut(logps, pooled, tokens, head)

    def _reference_pass(self, batch: Batch, *, pool: bool = False) -> ForwardOut:
        """The reference model on a batch (no gradient); its log-probs (and pooled states) go into the cache."""
        with torch.no_grad(), self._reference_context():
            ref = self._forward(self._reference_model(), batch, pool=pool)
        if self.reference_cache is not None:
            self.reference_cache.store_logps(batch.pairs, ref.logps)
            if pool:
                self.reference_cache.put("reps", batch.pairs, torch.stack(ref.pooled, dim=1).float().cpu().numpy())
        return ref

    def _reference_outputs(self, batch: Batch, *, pool: bool, hidden: bool) -> ForwardOut:
        """The reference's outputs on a batch: from the cache (log-probs, pooled states) when it holds them
        and its token hidden states are not needed, else one live pass (which fills the cache)."""
        cache = self.reference_cache
        if not hidden and cache is not None:
            logps = cache.lookup_logps(batch.pairs)
            reps = cache.get("reps", batch.pairs) if pool else None
            if logps is not None and (not pool or reps is not None):
                pooled = tuple(torch.from_numpy(reps[:, j]).to(self.device) for j in range(3)) if pool else None
                return ForwardOut(logps.to(device=self.device, dtype=torch.float32), pooled)
        return self._reference_pass(batch, pool=pool)

    def _policy_is_reference(self) -> bool:
        """True before the first update: LoRA's B matrices start at zero (checked, not assumed) and a full
        fine-tune starts from a copy of the reference, so the policy's outputs equal the reference's."""
        if self.state.step != 0:
            return False
        if self.ref_model is not None:
            return True
        lora_b = [p for n, p in self._unwrapped().named_parameters() if "lora_B" in n]
        return bool(lora_b) and all(not bool(p.detach().any()) for p in lora_b)

    def _compute(
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

        The reference runs live only when the objective needs its token distributions (a divergence
        regulariser, ε-DPO's perturbed logits, `keep_hidden` for the divergence traces) or its
        log-probs are not cached yet; otherwise the cached log-probs stand in for it. `reference`
        gives its outputs (token hidden states and log-probs) already computed; `policy_is_reference`
        (evaluation before the first update) takes the policy's outputs from the reference instead of a
        second pass.
        """
        mcfg = self.config.method
        lcfg, dcfg = mcfg.loss, mcfg.divergence
        b = batch.n_pairs
        use_kernel = self.kernel is not None and lcfg.gamma > 0
        use_div = train and dcfg.name != "none" and dcfg.alpha > 0
        use_eps = train and lcfg.epsilon_dpo > 0
        pool = want_reps or (use_kernel and self.encoder_reps is None)

        need_ref_hidden = use_div or use_eps or keep_hidden
        if policy_is_reference and not train:
            pol = reference = self._reference_outputs(batch, pool=pool, hidden=keep_hidden)
        else:
            pol = self._forward(self.model, batch, pool=pool)
        self._check_finite(pol.logps, "policy log-probabilities")
        ref = None
        if reference is not None and (reference.hidden is not None or not need_ref_hidden):
            ref = reference
        elif not need_ref_hidden and self.reference_cache is not None:
            cached = self.reference_cache.lookup_logps(batch.pairs)
            ref = ForwardOut(cached, None) if cached is not None else None
        if ref is None:
            ref = self._reference_pass(batch)
        ref_logps = ref.logps.to(device=pol.logps.device, dtype=pol.logps.dtype)

        reps = tuple(self._project(h) for h in pol.pooled) if pol.pooled is not None else None
        m_emb = None
        if use_kernel:
            m_emb = embedding_margin(
                self.kernel, *(self._encoder_batch(batch) if self.encoder_reps is not None else reps)
            )
            self._check_finite(m_emb, "embedding margin (kernel term)")

        loss_div = None
        if use_div:
            loss_div = token_divergence_from_hidden(
                dcfg,
                pol.hidden,
                ref.hidden,
                pol.head,
                ref_head_weight=ref.head,
                output_embeddings=self._output_embeddings(),
                cfg=dcfg,
            )
            self._check_finite(loss_div, f"divergence regulariser ({dcfg.name})")

        loss_entropy = self.kernel.entropy_penalty() if (train and use_kernel) else None

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
            )
            steps = epsilon_dpo_steps_from_token_logps(perturbed, batch.token_seq, b)
            beta_arg = epsilon_dpo_beta_per_pair(beta, steps, lcfg.epsilon_dpo)

        logps = pol.logps
        out = hybrid_dpo_loss(
            logps[:b],
            logps[b:],
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
                self._check_finite(value, name)
        terms = StepTerms(out=out, n_tokens=batch.n_tokens, steps=steps, reps=reps)
        if keep_hidden:
            terms.policy_hidden, terms.ref_hidden, terms.ref_logps = pol.hidden, ref.hidden, ref_logps
            terms.policy_head, terms.ref_head = pol.head, ref.head
        return terms

    def _check_finite(self, value: torch.Tensor, term: str) -> None:
        if not bool(torch.isfinite(value.detach()).all()):
            opt = self.config.optimisation
            raise TrainingDiverged(
                f"training diverged at step {self.state.step + 1}: {term} is not finite (NaN or inf). "
                f"Try a lower learning rate (now {opt.lr:g}), model.dtype float32 (now {self.config.model.dtype}), "
                f"or a smaller beta (now {self.state.beta:g})"
                + (
                    f", or a smaller divergence alpha (now {self.config.method.divergence.alpha:g})"
                    if "divergence" in term
                    else ""
                )
            )

    # ------------------------------------------------------------------ one optimiser step
    def _mean_over_processes(self, totals: dict[str, float]) -> dict[str, float]:
        """Each process's step means, averaged over processes: every process has the same number of
        pairs, so this is the mean over the global batch (not rank 0's share alone)."""
        keys = list(totals)
        local = torch.tensor([totals[k] for k in keys], dtype=torch.float64, device=self.device)
        mean = self.accelerator.reduce(local, reduction="mean")
        return {k: float(v) for k, v in zip(keys, mean.tolist())}

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
            totals["loss_entropy"] += (
                float(out.loss_entropy) if out.loss_entropy is not None else 0.0
            ) / opt.grad_accum
            totals["reward_acc"] += float((out.rho > 0).float().mean()) / opt.grad_accum
            totals["margin"] += float(out.margins.mean()) / opt.grad_accum
            if terms.steps is not None:
                step_sum += float(terms.steps.float().sum())
                step_count += int(terms.steps.numel())
            tokens += terms.n_tokens
        if self.accelerator.num_processes > 1:
            totals = self._mean_over_processes(totals)
            tokens = int(self.accelerator.reduce(torch.tensor([tokens], device=self.device), reduction="sum").item())
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
            stats = torch.tensor([step_sum, float(step_count)], device=self.device)
            if self.accelerator.num_processes > 1:
                stats = self.accelerator.reduce(stats, reduction="sum")
            self.state.beta = update_beta(self.state.beta, float(stats[0] / stats[1]), eps)
        self.state.step += 1
        elapsed = time.perf_counter() - t0
        self.state.train_seconds += elapsed
        self.state.tokens_seen += tokens
        row = {
            "step": self.state.step,
            "epoch": self.state.micro_index / self.batches_per_epoch,
            **totals,
            "beta": beta_now,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens / max(elapsed, 1e-9),
        }
        if self.kernel is not None:
            row.update({k: float(v) for k, v in self.kernel.weights().items()})
        return row
