"""Models users bring, one of each family: a two-layer model with random weights built from the
family's config and the bundled tokenizer trains two steps of HMK + KL with LoRA and evaluates, so a
family whose shapes, buffers, head or logits the engine mishandles fails here (as Gemma's 0-d
embedding scale once did) rather than on a user's GPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow  # trains a model per family

FAMILIES = {  # config class, model class, what the family needs beyond the common shape
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    # a cap low enough to bite on random weights
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "final_logit_softcapping": 0.5}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.5}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 2.0}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
}


def build_family_model(family: str, workspace, out: Path) -> Path:
    """A two-layer model of `family` with random weights and the bundled tokenizer, saved at `out`."""
    import transformers

    from dpo_engine.models.loading import smollm2_tokenizer

    config_name, model_name, extra = FAMILIES[family]
    tokenizer = smollm2_tokenizer(workspace)
    config = getattr(transformers, config_name)(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )
    torch.manual_seed(0)
    getattr(transformers, model_name)(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_trains_and_evaluates(workspace, tmp_path, family):
    from dpo_engine import rundir
    from dpo_engine.train.trainer import train
    from tests.test_train import make_config
    from tests.test_train_speed_paths import varied_pairs

    model_dir = build_family_model(family, workspace, tmp_path / family)
    cfg = make_config(
        model={"name": str(model_dir), "lora": True},
        method={"kernel": {"name": "hmk"}, "divergence": {"name": "kl"}, "loss": {"gamma": 0.5}},
        optimisation={"max_steps": 2},
        monitoring={"eval_every": 2, "eval_divergences": True, "divergence_pairs": 4},
    )
    summary = train(cfg, tmp_path / "run", workspace=workspace, pairs=varied_pairs(40))
    assert summary["status"] == "succeeded", summary["error"]
    metrics = rundir.read_metrics(tmp_path / "run")
    assert len(metrics) == 2 and np.isfinite(metrics["loss"]).all() and np.isfinite(metrics["grad_norm"]).all()
    assert len(rundir.read_eval(tmp_path / "run")) == 2  # step 0 and the end
