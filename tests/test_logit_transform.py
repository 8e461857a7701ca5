"""Models that do more than W h before the softmax (Gemma's soft cap, Cohere's and Granite's scales):
the trainer's chunked logits, log-probs, divergences and ε-DPO perturbations apply the same step and
its slope, checked against autograd on the full logits and against the models' own forward passes;
a model whose logits the trainer cannot reproduce is refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpo_engine.data.tokenize import TokenizedPair
from dpo_engine.divergences import DivergenceConfig, token_divergence, token_divergence_from_hidden
from dpo_engine.lm_head import head_token_logps, perturbed_token_logps
from dpo_engine.logit_transform import IDENTITY, LogitTransform, logit_transform
from dpo_engine.losses import token_logps

TRANSFORMS = [LogitTransform(softcap=2.0), LogitTransform(scale=0.25), LogitTransform(scale=3.0, softcap=4.0)]


def _case(seed: int = 0, n: int = 37, h: int = 16, v: int = 300):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64) * 2
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, v, (n,), generator=gen)
    return hidden, weight, labels


def test_a_value_that_is_not_a_number_is_not_read_as_one():
    from types import SimpleNamespace

    assert logit_transform(SimpleNamespace(logit_scale="inv_sqrt_d_model")) == IDENTITY  # MPT names a rule
    assert logit_transform(SimpleNamespace(final_logit_softcapping=None, logits_scaling=True)) == IDENTITY


def test_the_reference_cache_key_changes_with_the_transform_only():
    from dpo_engine.train.reference import model_key

    model = torch.nn.Linear(4, 3)
    model.register_buffer("scale", torch.tensor(2.0))  # a 0-d buffer, as Gemma's embedding scale
    cpu = torch.device("cpu")
    plain = model_key(model, torch.float32, cpu)
    assert model_key(model, torch.float32, cpu, IDENTITY) == plain  # other models keep their cached values
    assert model_key(model, torch.float32, cpu, LogitTransform(softcap=30.0)) != plain
    model.scale.fill_(3.0)
    assert model_key(model, torch.float32, cpu) != plain


def test_the_transform_is_read_from_each_family_config():
    from transformers import CohereConfig, Gemma2Config, GraniteConfig, LlamaConfig

    assert logit_transform(LlamaConfig()) == IDENTITY and IDENTITY.identity
    assert logit_transform(Gemma2Config()) == LogitTransform(softcap=30.0)
    assert logit_transform(CohereConfig(logit_scale=0.0625)) == LogitTransform(scale=0.0625)
    assert logit_transform(GraniteConfig(logits_scaling=8.0)) == LogitTransform(scale=0.125)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_head_log_probs_and_gradients_equal_autograd_on_the_full_logits(transform):
    hidden, weight, labels = _case()
    g = torch.randn(hidden.shape[0], dtype=torch.float64)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    plain = token_logps(transform.apply(h1 @ w1.T), labels)
    (plain * g).sum().backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    chunked = head_token_logps(h2, w2, labels, chunk_rows=8, transform=transform)
    (chunked * g).sum().backward()
    torch.testing.assert_close(chunked, plain)
    torch.testing.assert_close(h2.grad, h1.grad)
    torch.testing.assert_close(w2.grad, w1.grad)


@pytest.mark.parametrize("name", ["kl", "js", "wasserstein"])
def test_divergences_from_hidden_equal_the_logits_path_with_the_transform(name):
    transform = LogitTransform(scale=0.5, softcap=3.0)
    hidden, weight, _ = _case(1, n=19, v=120)
    ref_hidden = hidden + 0.3 * torch.randn_like(hidden)
    embeddings = torch.randn(weight.shape[0], 8, dtype=torch.float64)
    cfg = DivergenceConfig(name=name, chunk_positions=5)
    h1 = hidden.clone().requires_grad_()
    logits = transform.apply(h1 @ weight.T)[None]
    ref_logits = transform.apply(ref_hidden @ weight.T)[None]
    mask = torch.ones(1, hidden.shape[0], dtype=torch.bool)
    plain = token_divergence(cfg, logits, ref_logits, mask, output_embeddings=embeddings)
    plain.backward()
    h2 = hidden.clone().requires_grad_()
    chunked = token_divergence_from_hidden(
        cfg, h2, ref_hidden, weight, output_embeddings=embeddings, transform=transform
    )
    chunked.backward()
    torch.testing.assert_close(chunked, plain)
    torch.testing.assert_close(h2.grad, h1.grad)


def test_epsilon_dpo_perturbations_use_the_models_logits():
    transform = LogitTransform(softcap=2.5)
    hidden, weight, labels = _case(2)
    ref_hidden = hidden + 0.2
    got = perturbed_token_logps(hidden, ref_hidden, weight, labels, (0.01, -0.01), chunk_rows=8, transform=transform)
    z, z_ref = transform.apply(hidden @ weight.T), transform.apply(ref_hidden @ weight.T)
    for t, value in zip((0.01, -0.01), got):
        torch.testing.assert_close(value, token_logps((1 + t) * z - t * z_ref, labels))


def _tiny(family: str):
    from transformers import (
        CohereConfig,
        CohereForCausalLM,
        Gemma2Config,
        Gemma2ForCausalLM,
        GraniteConfig,
        GraniteForCausalLM,
    )

    shape = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    if family == "gemma2":  # a cap low enough to bite on random weights
        return Gemma2ForCausalLM(Gemma2Config(**shape, final_logit_softcapping=0.5)).eval()
    if family == "cohere":
        return CohereForCausalLM(CohereConfig(**shape, logit_scale=4.0)).eval()
    return GraniteForCausalLM(GraniteConfig(**shape, logits_scaling=0.2)).eval()


PAIRS = [TokenizedPair("a", [5, 6, 7], [8, 9], [10, 11, 12]), TokenizedPair("b", [13], [14, 15, 16], [17])]


def _own_log_probs(model, pairs) -> torch.Tensor:
    """Summed response log-probs (chosen then rejected) from the model's own forward and logits, one
    sequence at a time: the reference the trainer's paths are held to."""
    expected = []
    for response in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            ids = torch.tensor([p.prompt_ids + getattr(p, response)])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0]
            start = len(p.prompt_ids)
            expected.append(float(token_logps(logits[start - 1 : -1].double(), ids[0, start:]).sum()))
    return torch.tensor(expected, dtype=torch.float64)


@pytest.mark.parametrize("family", ["gemma2", "cohere", "granite"])
def test_sequence_log_probs_equal_the_models_own_forward(family):
    """The audit's reference log-probs (the chunked head with the model's transform) against the
    log-softmax of the logits the model's own forward returns."""
    from dpo_engine.analysis.audit.logprob_gap import sequence_logps

    model = _tiny(family)
    logps, _ = sequence_logps(model, PAIRS, pad_token_id=0)
    torch.testing.assert_close(logps.double(), _own_log_probs(model, PAIRS), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("packed", [True, False])
def test_the_trainers_passes_give_the_models_own_log_probs(packed):
    """ModelPasses.forward (the path of every training and evaluation batch) on a soft-capped model,
    packed and plain, against the log-softmax of the model's own logits."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from dpo_engine.train.passes import ModelPasses

    model = _tiny("gemma2")
    passes = ModelPasses(
        accelerator=Accelerator(cpu=True),
        device=torch.device("cpu"),
        tokenizer=SimpleNamespace(pad_token_id=0),
        model=model,
        ref_model=None,
        reference_cache=None,
        projection=torch.eye(32),
        encoder_reps=None,
        pack_pairs=packed,
    )
    with torch.no_grad():
        got = passes.forward(model, passes.collate(PAIRS), pool=False).logps
    torch.testing.assert_close(got.double(), _own_log_probs(model, PAIRS), rtol=1e-4, atol=1e-4)


def test_a_model_whose_logits_the_trainer_cannot_form_is_refused_in_one_line(monkeypatch):
    from accelerate import Accelerator

    from dpo_engine.train import passes

    accelerator = Accelerator(cpu=True)
    pair = TokenizedPair("a", [5, 6, 7], [8, 9], [10, 11])
    model = _tiny("gemma2")
    passes.check_logits_match_the_model(model, accelerator, pair)  # its cap is applied: accepted
    monkeypatch.setattr(passes, "logit_transform", lambda _config: IDENTITY)  # as if the cap were unknown
    with pytest.raises(ValueError, match="Gemma2ForCausalLM's logits are not its LM head") as err:
        passes.check_logits_match_the_model(model, accelerator, pair)
    assert "\n" not in str(err.value)


@pytest.fixture
def tiny_gemma_dir(workspace, tmp_path):
    """A two-layer Gemma-2 whose cap bites on its random weights, saved as a local model."""
    from tests.test_model_families import build_family_model

    return build_family_model("gemma2", workspace, tmp_path / "tiny-gemma2")


@pytest.mark.slow  # trains a model
def test_a_softcapped_model_trains_with_a_divergence_and_a_wrong_cap_is_refused(
    workspace, tmp_path, tiny_gemma_dir, monkeypatch
):
    from dpo_engine import rundir
    from dpo_engine.train import passes
    from dpo_engine.train.trainer import train
    from tests.test_train import make_config
    from tests.test_train_speed_paths import varied_pairs

    cfg = make_config(
        model={"name": str(tiny_gemma_dir), "lora": True},
        method={"kernel": {"name": "hmk"}, "divergence": {"name": "kl"}, "loss": {"gamma": 0.5}},
        optimisation={"max_steps": 3},
        monitoring={"eval_divergences": True, "divergence_pairs": 4},
    )
    summary = train(cfg, tmp_path / "capped", workspace=workspace, pairs=varied_pairs(40))
    assert summary["status"] == "succeeded", summary["error"]
    metrics = rundir.read_metrics(tmp_path / "capped")
    assert np.isfinite(metrics["loss"]).all() and np.isfinite(metrics["grad_norm"]).all()
    assert (rundir.read_eval(tmp_path / "capped")["div_kl"].dropna() >= 0).all()
    monkeypatch.setattr(passes, "logit_transform", lambda _config: IDENTITY)  # as if the cap were unknown
    with pytest.raises(ValueError, match="logits are not its LM head"):  # the job shows this line
        train(cfg, tmp_path / "uncapped", workspace=workspace, pairs=varied_pairs(40))
    assert rundir.read_json(tmp_path / "uncapped" / rundir.SUMMARY)["status"] == "failed"
