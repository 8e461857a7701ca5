"""Model registry and loading: deterministic tiny model, the converted SmolLM2 cache, clear errors."""

from __future__ import annotations

import pytest
import torch

from dpo_engine.models import UnknownModelError, load_policy, resolve_dtype
from dpo_engine.models.loading import indexed_cuda


def test_tiny_random_is_deterministic_and_shaped(workspace, tmp_path, monkeypatch):
    # a private model cache: this test deletes and rebuilds it, which must not pull the shared one
    # from under tests running beside it
    monkeypatch.setenv("DPO_KERNELS_MODEL_CACHE", str(tmp_path / "models"))
    model, tok = load_policy("tiny-random", workspace=workspace, dtype="float32")
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (2, 64, 4, 128)
    assert len(tok) == 49152 and cfg.vocab_size == 49152
    assert tok.pad_token_id is not None and tok.chat_template
    again, _ = load_policy("tiny-random", workspace=workspace, dtype="float32")
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    # a fresh build with the same seed gives the same weights (the cache is not what makes it deterministic)
    cache = workspace.models_dir / "tiny-random"
    import shutil

    shutil.rmtree(cache)
    rebuilt, _ = load_policy("tiny-random", workspace=workspace, dtype="float32")
    assert torch.equal(rebuilt.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_unknown_model_and_bad_dtype(workspace, tmp_path):
    with pytest.raises(UnknownModelError, match="unknown model 'nope'"):
        load_policy("nope", workspace=workspace)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnknownModelError, match="no config.json"):
        load_policy(str(tmp_path / "empty"), workspace=workspace)
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int3")
    assert resolve_dtype("auto", "cpu") == torch.float32


def test_explicit_bfloat16_is_refused_on_a_gpu_that_only_emulates_it(monkeypatch):
    """A T4 or V100 says bf16 is supported, by emulation, slower than fp32: an explicit request is one line."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(ValueError, match="Tesla T4 has no native bfloat16.*model.dtype float16 or auto"):
        resolve_dtype("bfloat16", "cuda:0")
    assert resolve_dtype("auto", "cuda:0") == torch.float32
    assert resolve_dtype("float16", "cuda:0") == torch.float16
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16  # a CPU run may ask for it


def test_local_directory_loads(workspace, tmp_path):
    model, tok = load_policy("tiny-random", workspace=workspace, dtype="float32")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    again, _ = load_policy(str(tmp_path / "m"), workspace=workspace, dtype="float32")
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)


@pytest.mark.real_model
def test_smollm2_converted_once_without_quantization_flags(workspace):
    model, tok = load_policy("smollm2-135m-instruct", workspace=workspace, dtype="float32")
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.hidden_size == 576 and len(tok) == 49152
    cache = workspace.models_dir / "smollm2-135m-instruct"
    assert (cache / "model.safetensors").is_file() and (cache / ".complete").is_file()
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits[0, -1]
    assert "Paris" in tok.decode(logits.argmax())


def test_a_gpu_device_map_names_the_gpu(monkeypatch):
    """A one-process accelerator's device is a bare "cuda"; transformers reads that device map as GPU 0,
    so the model is placed on the GPU `torch.cuda.set_device` chose."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert indexed_cuda("cuda") == torch.device("cuda", 3)
    assert indexed_cuda(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert indexed_cuda("cpu") == torch.device("cpu")
