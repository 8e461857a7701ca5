"""Random-weight models with the shapes of real 1B and 8B models, built from a config, for size tests.

Nothing is downloaded: the architecture is a Llama config with the layer sizes of the model it
stands in for, the tokenizer is the bundled one (so its vocabulary, 49,152 tokens, is smaller than
Llama 3's 128,256: the embedding and LM head are smaller than the real model's). Memory and speed
depend on the shapes, not on the values, so these stand in for the real models in benchmarks.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dpo_engine.models.loading import TINY_RANDOM, load_policy
from dpo_engine.workspace import Workspace

# Layer shapes of the models users train (from their published configs).
LLAMA_SHAPES: dict[str, dict[str, int]] = {
    # TinyLlama-1.1B
    "llama-1b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
    },
    # Llama-3-8B
    "llama-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
    },
}
_COMPLETE = ".complete"


def build_random_llama(
    shape: str, out: Path, *, workspace: Workspace, dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> Path:
    """Write a Hugging Face model directory of the given shape with random weights (once: an existing
    complete directory is reused) and the bundled tokenizer; return its path."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    out = Path(out)
    if (out / _COMPLETE).is_file():
        return out
    if shape not in LLAMA_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; use one of {', '.join(LLAMA_SHAPES)}")
    _, tokenizer = load_policy(TINY_RANDOM, workspace=workspace, dtype="float32")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **LLAMA_SHAPES[shape],
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / _COMPLETE).write_text(shape)
    return out


def llama_parameter_count(shape: str, vocab_size: int = 49152) -> int:
    """Parameters of a shape (embedding and untied LM head included), without building it."""
    s = LLAMA_SHAPES[shape]
    h, inter, layers = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    kv = h // s["num_attention_heads"] * s["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h
    return layers * per_layer + 2 * vocab_size * h + h
