"""Model passes over a batch, and where the reference's outputs come from.

`ModelPasses` runs the policy or the reference on a batch: the LM head runs on response tokens only
(prompt and padding logits are never formed), a chunk of rows at a time (lm_head.py), and a pass keeps
the final hidden states at those tokens so divergences and ε-DPO can form logits later. It also
projects representations for the kernel. Setup uses it for calibration, the step and evaluation for
every batch.

`ReferenceSource` is the one place that decides where the reference's outputs on a batch come from:
the policy itself before the first update, outputs already computed this run, the workspace cache
(reference.py), or a live pass.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from dpo_engine.data.tokenize import TokenizedPair
from dpo_engine.lm_head import head_logits, head_token_logps
from dpo_engine.logit_transform import logit_transform
from dpo_engine.losses import masked_mean_pool, sum_by_sequence
from dpo_engine.train.data import Batch, collate, collate_packed, packed_attention_mask, packed_block_mask
from dpo_engine.train.parts import EncoderReps, TrainingParts
from dpo_engine.train.reference import ReferenceCache


@contextlib.contextmanager
def final_hidden_state(model: torch.nn.Module):
    """Capture the decoder's last hidden state (the final norm's output) during a pass.

    Asking the model for `output_hidden_states` would keep every layer's output alive until the pass
    returns, which in a no-grad pass of a large model is gigabytes nobody reads; a forward hook on the
    decoder keeps only the one tensor the LM head and the pooling use. The pass still goes through the
    (DDP-wrapped) model, so gradient synchronisation is unchanged."""
    captured: list[torch.Tensor] = []

    def keep(_module, _args, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = model.get_decoder().register_forward_hook(keep)
    try:
        yield captured
    finally:
        handle.remove()


LOGIT_MATCH_TOLERANCE = 1e-3  # largest difference, as a share of the logits' scale, in fp32
LOGIT_MATCH_TOLERANCE_LOW_PRECISION = 3e-2  # in bf16 / fp16 (the model rounds its capped logits there)
LOGIT_MATCH_TOKENS = 32  # the check reads this many leading tokens: at a 256k vocabulary, 32 MB of logits


def lm_head_weight(inner: torch.nn.Module) -> torch.Tensor:
    """The (unwrapped) model's LM head weight W (V × H), refused in one line unless the head is a plain
    linear layer: logits are W h (then the model's transform), formed a chunk of rows at a time."""
    head = inner.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        raise ValueError(
            f"the LM head ({type(head).__name__}) must be a plain linear layer without a bias (if LoRA wraps it, "
            "leave it out of model.lora_target_modules; a head with a bias of its own is not supported)"
        )
    return head.weight


@torch.no_grad()
def check_logits_match_the_model(model: torch.nn.Module, accelerator: Accelerator, pair: TokenizedPair) -> None:
    """Once per run, before any pass: the logits the trainer forms (the head on the final hidden state,
    then the model's `logit_transform`) against the model's own forward on the first tokens of one
    pair. A model that does something else between its last hidden state and its logits would be
    trained on other log-probs than its own, so it is refused in one line."""
    inner = accelerator.unwrap_model(model)
    weight = lm_head_weight(inner)
    ids = torch.tensor([(pair.prompt_ids + pair.chosen_ids)[:LOGIT_MATCH_TOKENS]], device=accelerator.device)
    with accelerator.autocast(), final_hidden_state(inner) as captured:
        theirs = inner(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        ours = head_logits(captured[0], weight, logit_transform(inner.config))
    name = type(inner).__name__
    if ours.shape != theirs.shape:
        raise ValueError(
            f"{name}'s logits ({tuple(theirs.shape)}) are not its LM head's output ({tuple(ours.shape)}): "
            "this model is not supported"
        )
    theirs = theirs.float()
    gap = float(ours.float().sub_(theirs).abs_().amax() / theirs.abs().amax().clamp(min=1.0))
    exact = accelerator.mixed_precision == "no" and weight.dtype == torch.float32
    if not gap <= (LOGIT_MATCH_TOLERANCE if exact else LOGIT_MATCH_TOLERANCE_LOW_PRECISION):  # NaN fails too
        raise ValueError(
            f"{name}'s logits are not its LM head applied to its last hidden state (with the softcapping or "
            f"scaling its config names): they differ by {gap:.2g} of their scale, so the trainer cannot "
            "reproduce this model's log-probabilities; this model is not supported"
        )


@dataclass
class ForwardOut:
    """One model pass over a batch: sequence log-probs, pooled and response-token hidden states."""

    logps: torch.Tensor  # (2B,) chosen then rejected
    pooled: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # masked means of the last hidden state (B × H)
    hidden: torch.Tensor | None = None  # (N × H) final hidden states at the response tokens; None from the cache
    head: torch.Tensor | None = None  # (V × H) the model's LM head weight: logits = head @ hidden


class ModelPasses:
    """Forward passes of the policy and the reference, and the projection of their representations.

    Built from the objects it needs, so setup can calibrate with it before the optimiser exists."""

    def __init__(
        self,
        *,
        accelerator: Accelerator,
        device: torch.device,
        tokenizer,
        model: torch.nn.Module,
        ref_model: torch.nn.Module | None,
        reference_cache: ReferenceCache | None,
        projection: torch.Tensor,
        encoder_reps: EncoderReps | None,
        pack_pairs: bool,
    ) -> None:
        self.accelerator = accelerator
        self.device = device
        self.tokenizer = tokenizer
        self.model = model
        self.ref_model = ref_model
        self.reference_cache = reference_cache
        self.projection = projection
        self.encoder_reps = encoder_reps
        self.pack_pairs = pack_pairs
        self.logit_transform = logit_transform(accelerator.unwrap_model(model).config)  # W h -> the model's logits

    @classmethod
    def from_parts(cls, parts: TrainingParts) -> ModelPasses:
        return cls(
            accelerator=parts.accelerator,
            device=parts.device,
            tokenizer=parts.tokenizer,
            model=parts.model,
            ref_model=parts.ref_model,
            reference_cache=parts.reference_cache,
            projection=parts.projection,
            encoder_reps=parts.encoder_reps,
            pack_pairs=parts.pack_pairs,
        )

    # ------------------------------------------------------------------ batches and models
    def collate(self, pairs: list[TokenizedPair]) -> Batch:
        """The batch layout the config asks for: packed pairs (prompt once) or separate rows."""
        build = collate_packed if self.pack_pairs else collate
        return build(pairs, self.tokenizer.pad_token_id).to(self.device)

    def unwrapped(self) -> torch.nn.Module:
        """The policy without the accelerator's (DDP) wrapper."""
        return self.accelerator.unwrap_model(self.model)

    def reference_model(self) -> torch.nn.Module:
        return self.ref_model if self.ref_model is not None else self.unwrapped()

    def reference_context(self):
        """The reference is the base model with LoRA adapters off, or a frozen copy for full fine-tuning."""
        if self.ref_model is not None:
            return contextlib.nullcontext()
        return self.unwrapped().disable_adapter()

    def head_weight(self, model) -> torch.Tensor:
        """The model's LM head weight W (V × H) (`lm_head_weight`)."""
        return lm_head_weight(self.accelerator.unwrap_model(model))

    def output_embeddings(self) -> torch.Tensor:
        return self.head_weight(self.model)

    # ------------------------------------------------------------------ representations
    def project(self, h: torch.Tensor) -> torch.Tensor:
        h = F.normalize(h.float(), dim=-1)
        return F.normalize(h @ self.projection, dim=-1)

    def encoder_batch(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = [self.encoder_reps[p] for p in batch.pair_ids]
        stack = [torch.stack([r[j] for r in rows]).to(self.device) for j in range(3)]
        return self.project(stack[0]), self.project(stack[1]), self.project(stack[2])

    @staticmethod
    def attention_mask(batch: Batch, attention: str):
        """The mask in the form the model's attention takes: the padding mask of separate rows; for packed
        rows their block mask, as flex_attention's BlockMask, as a boolean (SDPA) or as an additive one (eager)."""
        if batch.segment is None:
            return batch.attention_mask.long()
        if attention == "flex_attention":
            return packed_block_mask(batch.segment, batch.owner)
        mask = packed_attention_mask(batch.segment, batch.owner)
        if attention == "eager":  # eager adds its mask to the scores
            mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(
                ~mask, torch.finfo(torch.float32).min
            )
        return mask

    # ------------------------------------------------------------------ passes
    def forward(self, model, batch: Batch, *, pool: bool) -> ForwardOut:
        """One pass; the LM head runs on the response tokens only (prompt and padding logits are never
        formed), a chunk of rows at a time, and log-probs come from a gather and a logsumexp."""
        inner = self.accelerator.unwrap_model(model)
        mask = self.attention_mask(batch, getattr(inner.config, "_attn_implementation", "sdpa"))
        with self.accelerator.autocast(), final_hidden_state(inner) as captured:
            model(
                input_ids=batch.input_ids,
                attention_mask=mask,
                position_ids=batch.position_ids,
                use_cache=False,
                logits_to_keep=1,
            )
            hidden = captured[0]
            tokens = hidden[batch.token_rows, batch.token_cols]
            head = self.head_weight(inner)
            token_values = head_token_logps(tokens, head, batch.token_labels, transform=self.logit_transform)
        logps = sum_by_sequence(token_values, batch.token_seq, 2 * batch.n_pairs)
        pooled = None
        if pool:
            pooled = tuple(masked_mean_pool(hidden[rows], m) for rows, m in zip(batch.pool_rows, batch.pool_masks))
        return ForwardOut(logps, pooled, tokens, head)

    def policy_pass(self, batch: Batch, *, pool: bool) -> ForwardOut:
        """The policy on a batch. Without a gradient (evaluation) it runs unwrapped: DDP would broadcast
        its buffers from rank 0 before each forward, and ranks evaluating different numbers of batches
        would then wait on each other's collectives."""
        return self.forward(self.model if torch.is_grad_enabled() else self.unwrapped(), batch, pool=pool)

    def reference_pass(self, batch: Batch, *, pool: bool = False) -> ForwardOut:
        """The reference model on a batch (no gradient); its log-probs (and pooled states) go into the cache."""
        with torch.no_grad(), self.reference_context():
            ref = self.forward(self.reference_model(), batch, pool=pool)
        if self.reference_cache is not None:
            self.reference_cache.store_logps(batch.pairs, ref.logps)
            if pool and self.reference_cache.missing("reps", batch.pairs):
                self.reference_cache.put("reps", batch.pairs, torch.stack(ref.pooled, dim=1).float().cpu().numpy())
        return ref


class ReferenceSource:
    """Where the reference's outputs on a batch come from, decided here and nowhere else.

    - Before the first update the policy is the reference (`policy_is_reference`), so evaluation takes
      one reference output for both (`as_policy`): the cache's log-probs and pooled states when it holds
      them and no token hidden states are needed, else one live pass.
    - Otherwise (`for_objective`): outputs already computed this run when they carry what is needed;
      the cached log-probs when the objective needs no token distributions; else a live pass, which
      fills the cache.
    """

    def __init__(self, passes: ModelPasses) -> None:
        self.passes = passes

    def policy_is_reference(self, step: int) -> bool:
        """True before the first update: LoRA's B matrices start at zero (checked, not assumed) and a full
        fine-tune starts from a copy of the reference, so the policy's outputs equal the reference's."""
        if step != 0:
            return False
        if self.passes.ref_model is not None:
            return True
        lora_b = [p for n, p in self.passes.unwrapped().named_parameters() if "lora_B" in n]
        return bool(lora_b) and all(not bool(p.detach().any()) for p in lora_b)

    def as_policy(self, batch: Batch, *, pool: bool, hidden: bool) -> ForwardOut:
        """The reference's outputs standing in for the policy's (policy = reference)."""
        cache = self.passes.reference_cache
        if not hidden and cache is not None:
            logps = cache.lookup_logps(batch.pairs)
            reps = cache.get("reps", batch.pairs) if pool else None
            if logps is not None and (not pool or reps is not None):
                device = self.passes.device
                pooled = tuple(torch.from_numpy(reps[:, j]).to(device) for j in range(3)) if pool else None
                return ForwardOut(logps.to(device=device, dtype=torch.float32), pooled)
        return self.passes.reference_pass(batch, pool=pool)

    def for_objective(self, batch: Batch, *, need_hidden: bool, known: ForwardOut | None = None) -> ForwardOut:
        """The reference's outputs for the objective; `need_hidden` when it forms the reference's token
        distributions (divergence, ε-DPO, divergence traces); `known` when already computed."""
        if known is not None and (known.hidden is not None or not need_hidden):
            return known
        cache = self.passes.reference_cache
        if not need_hidden and cache is not None:
            cached = cache.lookup_logps(batch.pairs)
            if cached is not None:
                return ForwardOut(cached, None)
        return self.passes.reference_pass(batch)
