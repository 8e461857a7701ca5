"""Sentence embeddings: bundled model offline, dedup and order, normalisation, the on-disk cache."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import pytest

from dpo_engine.embed import (
    DEFAULT_EMBEDDER,
    EmbedderNotAvailable,
    PairEmbeddings,
    bundled_model_dir,
    cache_path,
    embed_pairs,
    embed_texts,
    load_embedder,
    resolve_embedder,
    resolve_precision,
    table_content_hash,
)
from dpo_engine.embed.encoder import cpu_has_native_bf16

TEXTS = [
    "How do I bake bread at home?",
    "You need flour, water, salt and yeast; knead, let it rise, then bake at 230 C.",
    "I won't help with that.",
    "How do I bake bread at home?",
    "",
    "Bread",
]


def test_default_embedder_resolves_to_the_bundled_directory():
    path = bundled_model_dir()
    assert (path / "modules.json").is_file()
    assert resolve_embedder(DEFAULT_EMBEDDER) == str(path)
    assert resolve_embedder("sentence-transformers/all-MiniLM-L6-v2") == str(path)
    assert resolve_embedder(None) == str(path)


def test_unknown_embedder_fails_clearly_offline():
    with pytest.raises(EmbedderNotAvailable, match="not available offline"):
        load_embedder("nobody/no-such-embedder-model")


def test_embed_texts_matches_sentence_transformers_and_keeps_order():
    vectors = embed_texts(TEXTS, batch_size=2, precision="float32", backend="torch")
    assert vectors.shape == (len(TEXTS), 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(vectors[0], vectors[3])  # duplicate embedded once, copied back
    reference = load_embedder(DEFAULT_EMBEDDER, precision="float32", backend="torch").encode(
        TEXTS, batch_size=1, normalize_embeddings=True
    )
    cosine = np.sum(vectors * reference, axis=1)
    assert cosine.min() > 0.9999
    assert np.sum(vectors[0] * vectors[1]) > np.sum(vectors[0] * vectors[2])  # the answer is nearer its question


def test_bfloat16_precision_stays_within_cosine_0_99_of_float32(tmp_path):
    full = embed_texts(TEXTS, precision="float32", backend="torch")
    fast = embed_texts(TEXTS, precision="bfloat16", backend="torch")
    assert fast.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(fast, axis=1), 1.0, atol=1e-5)
    assert np.sum(full * fast, axis=1).min() > 0.99
    table = _table()
    path32 = cache_path(tmp_path, table_content_hash(table), DEFAULT_EMBEDDER, None, "float32", backend="torch")
    assert (
        cache_path(tmp_path, table_content_hash(table), DEFAULT_EMBEDDER, None, "bfloat16", backend="torch") != path32
    )
    with pytest.raises(ValueError, match="unknown precision"):
        embed_texts(TEXTS, precision="float16", backend="torch")  # type: ignore[arg-type]
    expected = "bfloat16" if cpu_has_native_bf16() else "float32"
    assert resolve_precision("auto", "cpu") == expected and resolve_precision("auto", "cuda:0") == "float32"


def test_progress_counts_every_input_text_and_stop_is_honoured():
    seen: list[tuple[int, int]] = []
    embed_texts(TEXTS, batch_size=2, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (len(TEXTS), len(TEXTS))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    with pytest.raises(InterruptedError):
        embed_texts(TEXTS, should_stop=lambda: True)


def test_embed_texts_rejects_bad_input():
    with pytest.raises(TypeError, match="text 1"):
        embed_texts(["ok", None])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="batch_size"):
        embed_texts(["ok"], batch_size=0)
    assert embed_texts([]).shape == (0, 384)


def _table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "pair_id": ["p1", "p2", "p3"],
            "prompt": ["How do I bake bread?", "How do I bake bread?", "Tell me a joke."],
            "chosen": [
                "Knead flour and water, let it rise, bake.",
                "Use yeast.",
                "Why did the chicken cross the road?",
            ],
            "rejected": ["No.", "Buy it.", "I don't know any jokes."],
        }
    )


def test_embed_pairs_embeds_each_part_separately(tmp_path):
    table = _table()
    # float32: with "auto", a CPU with native bf16 embeds in bfloat16, whose rounding depends on the
    # padded length of the batch, so a part embedded with its batch-mates differs by ~1e-3
    exact = {"backend": "torch", "precision": "float32"}
    pairs = embed_pairs(table, **exact)
    np.testing.assert_allclose(pairs.prompt, embed_texts(list(table["prompt"]), **exact), atol=1e-6)
    np.testing.assert_allclose(pairs.chosen, embed_texts(list(table["chosen"]), **exact), atol=1e-6)
    np.testing.assert_allclose(pairs.rejected, embed_texts(list(table["rejected"]), **exact), atol=1e-6)
    # the default int8 backend quantises activations per batch, so a text's vector depends slightly on
    # its batch-mates: close to, not equal to, the vector embedded alone
    default = embed_pairs(table)
    alone = embed_texts(list(table["chosen"]))
    assert np.sum(default.chosen * alone, axis=1).min() > 0.98


def test_cache_returns_identical_arrays_and_keys_on_content_and_settings(tmp_path):
    table = _table()
    first = embed_pairs(table, cache_dir=tmp_path)
    path = cache_path(tmp_path, table_content_hash(table), DEFAULT_EMBEDDER, None)
    assert path.is_file()
    stamp = path.stat().st_mtime_ns
    calls: list[tuple[int, int]] = []
    second = embed_pairs(table, cache_dir=tmp_path, progress=lambda d, t: calls.append((d, t)))
    assert path.stat().st_mtime_ns == stamp  # loaded, not rewritten
    assert calls == [(9, 9)]  # no batch progress: nothing was embedded
    for a, b in ((first.prompt, second.prompt), (first.chosen, second.chosen), (first.rejected, second.rejected)):
        np.testing.assert_array_equal(a, b)
    assert cache_path(tmp_path, table_content_hash(table), DEFAULT_EMBEDDER, 32) != path
    changed = table.assign(rejected=["No!", "Buy it.", "I don't know any jokes."])
    assert table_content_hash(changed) != table_content_hash(table)
    truncated = embed_pairs(table, cache_dir=tmp_path, max_seq_length=4)
    assert not np.allclose(truncated.chosen[0], first.chosen[0], atol=1e-3)
    assert len(list(tmp_path.glob("*.npz"))) == 2


def test_pair_embeddings_npz_round_trip_and_validation(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((4, 8)).astype(np.float32) for _ in range(3)]
    pairs = PairEmbeddings(*arrays)
    back = PairEmbeddings.load_npz(pairs.save_npz(tmp_path / "e.npz"))
    for a, b in zip(arrays, (back.prompt, back.chosen, back.rejected)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="one shape"):
        PairEmbeddings(arrays[0], arrays[1], arrays[2][:3])
    with pytest.raises(FileNotFoundError):
        PairEmbeddings.load_npz(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="lacks column"):
        embed_pairs(pd.DataFrame({"prompt": ["a"], "chosen": ["b"]}))


@pytest.mark.parametrize(("backend", "floor"), [("onnx", 0.9999), ("onnx-int8", 0.97)])
def test_onnx_backends_agree_with_torch_float32(backend, floor):
    """The locally exported model gives the torch embeddings (float32 exactly, int8 closely), order kept."""
    texts = [t for t in TEXTS if t] + [
        "A much longer text that spans several clauses, so that padding and the "
        "attention mask matter when it shares a batch with short ones."
    ] * 2
    reference = embed_texts(texts, precision="float32", backend="torch")
    got = embed_texts(texts, backend=backend, batch_size=3)
    assert got.shape == reference.shape and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert np.sum(got * reference, axis=1).min() >= floor


def test_backend_is_part_of_the_cache_key_and_onnx_needs_the_cpu(tmp_path):
    keys = {
        cache_path(tmp_path, "h", DEFAULT_EMBEDDER, None, "float32", backend=b) for b in ("torch", "onnx", "onnx-int8")
    }
    assert len(keys) == 3
    with pytest.raises(ValueError, match="runs on the CPU"):
        load_embedder(device="cuda", backend="onnx")
    with pytest.raises(ValueError, match="unknown backend"):
        load_embedder(backend="tensorrt")


@pytest.mark.parametrize("backend", ["onnx", "onnx-int8"])
def test_onnx_texts_are_tokenized_once_with_the_same_batches(backend):
    """Ids tokenized once and padded here feed the model exactly what the tokenizer's own padding feeds."""
    model = load_embedder(backend=backend)
    texts = list(dict.fromkeys(TEXTS)) + [
        "A longer text, so that the batch is padded to its length and the mask matters."
    ]
    ids = model.tokenize(texts)
    np.testing.assert_array_equal(model.encode_ids(ids), model.encode(texts))
    # embed_texts (one tokenization) gives what tokenizing each batch again gives: int8 activations are
    # quantised per batch, so the comparison keeps embed_texts' batches (distinct texts, longest first, 3 a batch)
    order = sorted(range(len(texts)), key=lambda i: len(ids[i]), reverse=True)
    expected = np.empty((len(texts), model.dimension), dtype=np.float32)
    for start in range(0, len(order), 3):
        batch = order[start : start + 3]
        expected[batch] = model.encode([texts[i] for i in batch])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(embed_texts(texts, backend=backend, batch_size=3), expected, atol=1e-6)


def test_onnx_sessions_side_by_side_give_what_one_session_gives():
    """Batches run on several single-threaded sessions at once come back in order and equal to one session's."""
    from dpo_engine.embed.onnx_backend import OnnxSentenceEncoder, session_layout

    assert session_layout(2) == (2, 1) and session_layout(1) == (1, 1)
    assert session_layout(32) == (8, 4) and session_layout(4, sessions=1) == (1, 4)
    st_model = load_embedder(backend="torch", precision="float32")
    model_dir = resolve_embedder(None)
    one = OnnxSentenceEncoder(st_model, model_dir, quantize=True, sessions=1)
    three = OnnxSentenceEncoder(st_model, model_dir, quantize=True, sessions=3)
    texts = [f"text number {i} " + "word " * (i % 7) for i in range(40)]
    ids = one.tokenize(texts)
    batches = [ids[i : i + 3] for i in range(0, len(ids), 3)]
    expected = np.concatenate([one.encode_ids(b) for b in batches])
    np.testing.assert_array_equal(np.concatenate(list(three.encode_batches(batches))), expected)


def test_stopping_an_onnx_embedding_cancels_the_batches_not_started():
    asked = []

    def should_stop() -> bool:
        asked.append(1)
        return len(asked) > 2

    texts = [f"sentence {i} about something" for i in range(200)]
    with pytest.raises(InterruptedError):
        embed_texts(texts, backend="onnx-int8", batch_size=4, should_stop=should_stop)
    # every batch asks before it starts; those after the stop are cancelled, not asked
    assert len(asked) < 50
