"""How much memory a training run will need, known before it is queued.

The estimate adds what a step holds at its peak (docs/METHOD.md 2.9 has the terms):

* weights: every parameter in the dtype it is stored in (`setup.weight_dtype`; with 4-bit loading
  the linear layers' weights at NF4_BYTES_PER_PARAM, the rest in fp32 as peft prepares them),
  plus, for a full fine-tune, the frozen reference in the same fp32;
* trainable state: fp32 weights, gradients and AdamW's two moments of what is trained (the LoRA
  adapters, or every parameter);
* activations: chosen and rejected of `batch_size` pairs at `max_length` tokens. With gradient
  checkpointing each layer keeps only its input, plus one layer's working set recomputed in the
  backward pass; without it every layer keeps its working set. An evaluation batch larger than the
  training one (`monitoring.eval_batch_size`) holds one layer's working set of its own size, no grad;
* the LM head: one chunk of logits and its gradient (dpo_engine/lm_head.py), or the divergence
  regulariser's chunk of policy and reference distributions when it holds more;
* the runtime: interpreter, libraries, tokenizer and data on the CPU; the CUDA context on a GPU.

Model shapes come from the model's config, with parameters counted on the meta device, so nothing
is loaded. The constants are checked against measured peaks by scripts/bench_scale.py
(docs/BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dpo_engine.logit_transform import logit_transform

GiB = 1024**3
# Values held per token and layer beyond the layer input, in units of hidden size (attention
# projections, norms, MLP input) and of intermediate size (gate, up, their product).
_WORKING_SET_HIDDEN = 10
_WORKING_SET_INTERMEDIATE = 3
# Logits, their log-softmax and its gradient for one chunk of rows, in fp32.
_LOGIT_COPIES = 3
# The divergence regulariser's chunk (divergences._pointwise_value_and_grad): the policy's and the
# reference's log-softmax, the policy's probabilities, their difference, its product and the gradient.
_DIVERGENCE_LOGIT_COPIES = 6
# A soft cap on the logits (Gemma, logit_transform.py) adds its tanh and its slope to either chunk.
_SOFTCAP_LOGIT_COPIES = 2
# Interpreter, torch, transformers, tokenizer and a dataset in host memory, and what the allocator
# keeps between steps (the one constant set from a measurement: METHOD.md 2.9).
RUNTIME_BYTES_CPU = int(1.6 * GiB)
# The CUDA context and the caching allocator's slack beside what tensors hold.
RUNTIME_BYTES_CUDA = int(0.8 * GiB)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# NF4 with double quantisation: 4 bits per weight plus about 0.127 bits of block constants (QLoRA paper, 3.1).
NF4_BYTES_PER_PARAM = (4 + 0.127) / 8


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model: its sizes, and the parameters LoRA would train."""

    n_params: int
    n_layers: int
    hidden: int
    intermediate: int
    vocab: int
    n_heads: int
    lora_params_per_rank: int  # adapter parameters at rank 1 over the targeted modules (scales with r)
    linear_params: int = 0  # weights of the decoder's linear layers (what 4-bit loading quantises)
    logit_softcap: bool = False  # the model caps its logits (logit_transform.py): more copies per chunk


@dataclass
class MemoryEstimate:
    """Predicted peak bytes by component, against what the device has."""

    components: dict[str, int]
    device: str
    available: int | None
    advice: list[str] = field(default_factory=list)
    free: bool = False  # `available` is what the device has free now, not its total

    @property
    def total(self) -> int:
        return sum(self.components.values())

    @property
    def fits(self) -> bool:
        return self.available is None or self.total <= self.available

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in self.components.items() if v)
        free = " free" if self.free else ""
        have = f" of {self.available / GiB:.1f} GiB{free} on {self.device}" if self.available else f" on {self.device}"
        return f"predicted peak {self.total / GiB:.2f} GiB{have} ({parts} GiB)"


def model_shape(model_dir: str, target_modules: list[str], trust_remote_code: bool = False) -> ModelShape:
    """Sizes of the model in `model_dir`, read from its config (the model is built on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    n_params = sum(p.numel() for p in model.parameters())
    per_rank = linear = 0
    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            linear += module.weight.numel()
            if name.rsplit(".", 1)[-1] in target_modules:
                per_rank += module.in_features + module.out_features
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ModelShape(
        n_params=n_params,
        n_layers=int(text.num_hidden_layers),
        hidden=int(text.hidden_size),
        intermediate=int(getattr(text, "intermediate_size", 4 * text.hidden_size)),
        vocab=int(text.vocab_size),
        n_heads=int(text.num_attention_heads),
        lora_params_per_rank=per_rank,
        linear_params=linear,
        logit_softcap=logit_transform(config).softcap is not None,
    )


def estimate_peak(shape: ModelShape, **settings) -> MemoryEstimate:
    """Predicted peak memory of one training step (see the module docstring for the terms) and, when
    it will not fit, the changes that would each make it fit (`MemoryEstimate.advice`). `settings`
    are `_estimate`'s keyword arguments."""
    estimate = _estimate(shape, **settings)
    if not estimate.fits:
        estimate.advice = _advice(shape, settings)
    return estimate


def _estimate(
    shape: ModelShape,
    *,
    lora: bool,
    lora_r: int,
    compute_dtype: str,
    batch_size: int,
    max_length: int,
    gradient_checkpointing: bool,
    device: str,
    available: int | None,
    head_chunk_rows: int,
    load_in_4bit: bool = False,
    eval_batch_size: int | None = None,
    divergence_chunk_rows: int | None = None,
) -> MemoryEstimate:
    compute = DTYPE_BYTES[compute_dtype]
    stored = compute if lora else 4
    if load_in_4bit:
        # peft's prepare_model_for_kbit_training casts every weight it did not quantise to fp32
        rest = shape.n_params - shape.linear_params
        components = {"weights": int(shape.linear_params * NF4_BYTES_PER_PARAM) + rest * 4}
    else:
        components = {"weights": shape.n_params * stored}
    components["reference"] = 0 if lora else shape.n_params * stored
    trainable = shape.lora_params_per_rank * lora_r if lora else shape.n_params
    # fp32 weights (a full fine-tune's are counted above), gradients, AdamW's two moments
    components["trainable state"] = trainable * (4 + 4 + 8) if lora else trainable * (4 + 8)
    tokens = 2 * batch_size * max_length

    def one_layer(pairs: int) -> int:
        """One layer's working set for `pairs` pairs: projections, norms, MLP, attention scores and probabilities."""
        per_token = shape.hidden * _WORKING_SET_HIDDEN + shape.intermediate * _WORKING_SET_INTERMEDIATE
        attention = 2 * pairs * shape.n_heads * max_length * max_length
        return (2 * pairs * max_length * per_token + attention) * compute

    if gradient_checkpointing:
        components["activations"] = shape.n_layers * tokens * shape.hidden * compute + one_layer(batch_size)
    else:
        components["activations"] = shape.n_layers * one_layer(batch_size)
    # an evaluation pass keeps nothing for backward: one layer of its own batch at a time
    components["activations"] = max(components["activations"], one_layer(eval_batch_size or batch_size))
    # the head's chunk and the divergence's are formed one after the other: the larger counts
    cap = _SOFTCAP_LOGIT_COPIES if shape.logit_softcap else 0
    divergence_rows = (divergence_chunk_rows or 0) * (_DIVERGENCE_LOGIT_COPIES + cap)
    components["logits"] = max(head_chunk_rows * (_LOGIT_COPIES + cap), divergence_rows) * shape.vocab * 4
    components["runtime"] = RUNTIME_BYTES_CUDA if device.startswith("cuda") else RUNTIME_BYTES_CPU
    return MemoryEstimate(components, device, available)


def _advice(shape: ModelShape, settings: dict) -> list[str]:
    """The changes that would each make the run fit, each checked by estimating again (a batch or a
    length lowered as far as it needs, by halving); when none does alone, all of them together if
    that fits; else a device with more memory."""
    s = settings

    def fits(**change) -> bool:
        return _estimate(shape, **{**s, **change}).fits

    def smaller_batch(size: int) -> dict:
        return {"batch_size": size, "eval_batch_size": min(size, s.get("eval_batch_size") or size)}

    def halvings(value: int, floor: int) -> list[int]:
        out = []
        while value // 2 >= floor:
            value //= 2
            out.append(value)
        return out

    candidates: list[tuple[str, dict]] = []
    if not s["lora"]:
        candidates.append(("train LoRA adapters (model.lora true) instead of every weight", {"lora": True}))
    elif not s.get("load_in_4bit") and s["device"].startswith("cuda"):
        candidates.append(("store the frozen base in 4-bit (model.load_in_4bit true: QLoRA)", {"load_in_4bit": True}))
    if not s["gradient_checkpointing"]:
        candidates.append(
            ("turn gradient checkpointing on (model.gradient_checkpointing on)", {"gradient_checkpointing": True})
        )
    batches = halvings(s["batch_size"], 1)
    if batches:
        size = next((b for b in batches if fits(**smaller_batch(b))), batches[-1])
        factor = s["batch_size"] // size
        text = f"lower the batch to {size} (optimisation.batch_size {size}) and multiply grad_accum by {factor}"
        if (s.get("eval_batch_size") or 0) > size:  # an evaluation batch set apart must come down with it
            text += f", with monitoring.eval_batch_size {size}"
        candidates.append((text, smaller_batch(size)))
    lengths = halvings(s["max_length"], 128)
    if lengths:
        length = next((n for n in lengths if fits(max_length=n)), lengths[-1])
        candidates.append((f"shorten sequences (data.max_length {length})", {"max_length": length}))
    if DTYPE_BYTES[s["compute_dtype"]] > 2:
        half = half_dtype(s["device"])
        candidates.append((f"use {half} weights (model.dtype {half})", {"compute_dtype": half}))
    fitting = [text for text, change in candidates if fits(**change)]
    if fitting:
        return fitting
    together = {k: v for _, change in candidates for k, v in change.items()}
    if len(candidates) > 1 and fits(**together):
        return ["all of these together: " + ", ".join(text for text, _ in candidates)]
    return ["use a device with more memory (no change of these settings makes it fit)"]


def half_dtype(device: str) -> str:
    """The 16-bit dtype a run on `device` can use: float16 on GPUs without native bfloat16 (T4, V100),
    which `resolve_dtype` refuses bfloat16 on."""
    if device.startswith("cuda"):
        import torch

        from dpo_engine.models.loading import native_bf16

        if torch.cuda.is_available() and not native_bf16(device):
            return "float16"
    return "bfloat16"


def device_memory(device: str, *, free: bool = False) -> int | None:
    """Bytes the device offers a new job: the host's available memory; a GPU's total memory, or with
    `free` what other processes leave of it now. `free` opens a CUDA context (a few hundred MB held
    until the process ends), so only the job's own process asks for it, just before it loads."""
    import psutil

    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None
        index = torch.device(device).index or 0
        if free:
            return int(torch.cuda.mem_get_info(index)[0])
        return int(torch.cuda.get_device_properties(index).total_memory)
    return int(psutil.virtual_memory().available)
