"""Sentence embeddings through ONNX Runtime: the same model exported locally, optionally int8.

The sentence-transformers model (transformer + mean pooling + L2 normalisation) is exported once
with torch's TorchScript-based ONNX exporter into the workspace's model cache (nothing is
downloaded), and, for ``onnx-int8``, quantised with ONNX Runtime's dynamic int8 quantisation
(per-channel int8 weights of the matrix products, activations quantised on the fly; fast on CPUs
with VNNI). Tokenisation is the
model's own fast tokenizer with its ``max_seq_length``. Batches of a few short texts are too small
for one session to use several cores well, so the encoder holds one single-threaded session per core
and runs batches on them side by side (ONNX Runtime releases the GIL while it runs).
scripts/bench_diagnose.py measures speed and checks that the eight metrics stay within one bootstrap
SE of the float32 torch ones.
"""

from __future__ import annotations

import copy
import hashlib
import os
import queue
import tempfile
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ONNX_OPSET = 17
# Exported with the eager attention: its graph adds the mask as a bias; the SDPA export guards fully
# masked rows with Where/IsNaN nodes that cost a tenth of the int8 model's time (BENCHMARKS.md).
EXPORT_ATTENTION = "eager"
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Sessions side by side at most: each holds its own copy of the weights; more cores go to each session.
MAX_SESSIONS = 8


def session_layout(cores: int, sessions: int | None = None) -> tuple[int, int]:
    """(sessions, threads per session) for ``cores`` cores: one single-threaded session per core up to
    `MAX_SESSIONS`, the rest of the cores shared among them; ``sessions`` overrides the count."""
    cores = max(1, int(cores))
    count = max(1, int(sessions)) if sessions is not None else min(cores, MAX_SESSIONS)
    return count, max(1, cores // count)


def available_cores() -> int:
    """Cores this process may use: ``OMP_NUM_THREADS`` when the operator set it (e.g. to run several
    processes side by side), else the CPU affinity."""
    chosen = os.environ.get("OMP_NUM_THREADS", "").strip()
    if chosen.isdigit() and int(chosen) > 0:
        return int(chosen)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def onnx_cache_dir() -> Path:
    """Where exported models live: the workspace's model cache (``$DPO_KERNELS_MODEL_CACHE`` honoured)."""
    from dpo_engine.workspace import Workspace

    return Workspace.resolve().models_dir / "onnx"


def _export_key(model_dir: str) -> str:
    import onnxruntime
    import torch

    parts = [
        str(Path(model_dir).resolve()),
        torch.__version__,
        onnxruntime.__version__,
        str(ONNX_OPSET),
        EXPORT_ATTENTION,
    ]
    stamp = "|".join(parts)
    weights = sorted(Path(model_dir).glob("*.safetensors")) + sorted(Path(model_dir).glob("*.bin"))
    for w in weights:
        stamp += f"|{w.name}:{w.stat().st_size}:{int(w.stat().st_mtime)}"
    return hashlib.sha256(stamp.encode()).hexdigest()[:16]


def _check_pooling(st_model) -> None:
    modules = list(st_model)
    pooling = getattr(modules[1], "pooling_mode", None) if len(modules) > 1 else None
    if pooling != "mean" or len(modules) > 3:
        raise ValueError(
            "the ONNX backend supports transformer + mean pooling (+ normalize) sentence-transformers models; "
            f"this one has {[type(m).__name__ for m in modules]} (pooling {pooling!r}): use --backend torch"
        )


def export_onnx(st_model, model_dir: str, quantize: bool) -> Path:
    """Export (once) the model to ONNX, int8-quantised when asked; returns the .onnx path."""
    import torch

    _check_pooling(st_model)
    target_dir = onnx_cache_dir() / f"{Path(model_dir).name}-{_export_key(model_dir)}"
    fp32 = target_dir / "model.onnx"
    int8 = target_dir / "model-int8-pc.onnx"
    wanted = int8 if quantize else fp32
    if wanted.is_file():
        return wanted
    target_dir.mkdir(parents=True, exist_ok=True)
    if not fp32.is_file():
        transformer = copy.deepcopy(st_model[0].auto_model).float().eval()
        transformer.set_attn_implementation(EXPORT_ATTENTION)

        class Pooled(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, input_ids, attention_mask, token_type_ids):
                hidden = self.inner(
                    input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
                ).last_hidden_state
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                return torch.nn.functional.normalize(mean, dim=-1)

        example = st_model.tokenizer(["an example", "a second, longer example"], padding=True, return_tensors="pt")
        if "token_type_ids" not in example:
            example["token_type_ids"] = torch.zeros_like(example["input_ids"])
        fd, tmp = tempfile.mkstemp(dir=target_dir, suffix=".onnx.tmp")
        os.close(fd)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    Pooled(transformer),
                    tuple(example[k] for k in _INPUTS),
                    tmp,
                    input_names=list(_INPUTS),
                    output_names=["embedding"],
                    dynamic_axes={**{k: {0: "batch", 1: "sequence"} for k in _INPUTS}, "embedding": {0: "batch"}},
                    opset_version=ONNX_OPSET,
                    dynamo=False,
                )
            os.replace(tmp, fp32)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    if quantize and not int8.is_file():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        fd, tmp = tempfile.mkstemp(dir=target_dir, suffix=".onnx.tmp")
        os.close(fd)
        try:
            # per-channel int8 weights of the matrix products only: cosine to float32 >= 0.98 on HH texts
            # (per-tensor weights of every op: 0.88)
            quantize_dynamic(
                str(fp32), tmp, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"]
            )
            os.replace(tmp, int8)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return wanted


class OnnxSentenceEncoder:
    """Encode texts with an exported model: the model's tokenizer, ONNX Runtime, L2-normalised float32 rows."""

    def __init__(self, st_model, model_dir: str, quantize: bool, sessions: int | None = None):
        import onnxruntime as ort

        self.path = export_onnx(st_model, model_dir, quantize)
        self.tokenizer = st_model.tokenizer
        self.max_seq_length = int(st_model.max_seq_length)
        self.dimension = int(
            st_model.get_embedding_dimension()
            if hasattr(st_model, "get_embedding_dimension")
            else st_model.get_sentence_embedding_dimension()
        )
        count, threads = session_layout(available_cores(), sessions)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle worker threads sleep instead of spinning: on a busy or shared CPU spinning burns a third
        # of the CPU time for nothing (measured in scripts/bench_diagnose.py).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(count):
            self._idle.put(ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"]))
        self.parallelism = count
        pad = self.tokenizer.pad_token_id
        self._pad_id = int(pad) if pad is not None else 0
        self._pad_left = getattr(self.tokenizer, "padding_side", "right") == "left"

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (truncated to ``max_seq_length``, special tokens included), unpadded.

        `embed_texts` tokenizes every text once with this, orders the texts by length and hands
        batches of these ids to `encode_ids`, instead of tokenizing once for the order and again per batch.
        """
        return self.tokenizer(
            list(texts),
            truncation=True,
            max_length=self.max_seq_length,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]

    def encode_ids(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Embeddings of already tokenized texts, padded on the tokenizer's side as it pads, one segment."""
        width = max(len(x) for x in ids)
        input_ids = np.full((len(ids), width), self._pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(ids), width), dtype=np.int64)
        for row, x in enumerate(ids):
            cols = slice(width - len(x), width) if self._pad_left else slice(0, len(x))
            input_ids[row, cols] = x
            attention_mask[row, cols] = 1
        return self._run(
            {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": np.zeros_like(input_ids)}
        )

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of texts padded by the tokenizer itself: the plain path `encode_ids` is tested against."""
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_seq_length, return_tensors="np"
        )
        feed = {k: batch[k].astype(np.int64) for k in _INPUTS if k in batch}
        if "token_type_ids" not in feed:
            feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
        return self._run(feed)

    def encode_batches(
        self, batches: Iterable[Sequence[Sequence[int]]], should_stop: Callable[[], bool] | None = None
    ) -> Iterator[np.ndarray]:
        """`encode_ids` of each batch of token ids, in order, the batches run on the sessions side by side.

        At most two batches per session are in flight; ``should_stop()`` is checked before each batch
        starts, and stopping (or any error) cancels the batches not yet started.
        """

        def encode(ids: Sequence[Sequence[int]]) -> np.ndarray:
            if should_stop is not None and should_stop():
                raise InterruptedError("embedding stopped on request")
            return self.encode_ids(ids)

        pool = ThreadPoolExecutor(max_workers=self.parallelism, thread_name_prefix="onnx-encoder")
        pending: deque = deque()
        try:
            for ids in batches:
                pending.append(pool.submit(encode, ids))
                if len(pending) >= 2 * self.parallelism:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        session = self._idle.get()  # a free session; ONNX Runtime sessions may not run one call twice at once
        try:
            return np.asarray(session.run(None, feed)[0], dtype=np.float32)
        finally:
            self._idle.put(session)
