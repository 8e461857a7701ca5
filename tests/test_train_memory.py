"""The memory estimate: shapes read without loading the model equal the loaded model's, the terms
follow their formulas, and a run predicted not to fit is refused before it starts (CLI and job).

How close the estimate comes to measured peaks is scripts/bench_scale.py's `estimate` part."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model

from dpo_engine.jobs import JobStore
from dpo_engine.models import load_policy
from dpo_engine.models.loading import model_directory
from dpo_engine.train.memory import GiB, ModelShape, estimate_peak, model_shape
from tests.conftest import HH_SAMPLE

CLI = [sys.executable, "-m", "dpo_engine.cli"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_shape_from_the_config_equals_the_loaded_model(workspace):
    shape = model_shape(model_directory("tiny-random", workspace=workspace), TARGETS)
    model, _ = load_policy("tiny-random", workspace=workspace, dtype="float32")
    assert shape.n_params == sum(p.numel() for p in model.parameters())
    assert shape.n_layers == model.config.num_hidden_layers and shape.vocab == model.config.vocab_size
    head = model.get_output_embeddings()
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    assert shape.linear_params == sum(m.weight.numel() for m in linear) > 0  # what 4-bit loading quantises
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=TARGETS))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert shape.lora_params_per_rank * 4 == trainable  # peft counts the same adapters


SHAPE = ModelShape(
    n_params=1_000_000_000,
    n_layers=20,
    hidden=2048,
    intermediate=5632,
    vocab=50_000,
    n_heads=16,
    lora_params_per_rank=1_000_000,
    linear_params=800_000_000,
)


def _estimate_settings(**overrides) -> dict:
    settings = dict(
        lora=True,
        lora_r=8,
        compute_dtype="bfloat16",
        batch_size=2,
        max_length=256,
        gradient_checkpointing=True,
        device="cuda:0",
        available=40 * GiB,
        head_chunk_rows=256,
    )
    return {**settings, **overrides}


def _estimate(**overrides):
    return estimate_peak(SHAPE, **_estimate_settings(**overrides))


def test_terms_follow_their_formulas():
    lora = _estimate()
    assert lora.components["weights"] == SHAPE.n_params * 2  # frozen base in bf16
    assert lora.components["reference"] == 0  # the policy with adapters off is the reference
    assert lora.components["trainable state"] == 8 * SHAPE.lora_params_per_rank * 16
    full = _estimate(lora=False)
    assert full.components["weights"] == SHAPE.n_params * 4  # fp32 masters
    assert full.components["reference"] == SHAPE.n_params * 4  # a copy of the fp32 policy
    assert full.components["trainable state"] == SHAPE.n_params * 12  # gradients + two AdamW moments
    # Checkpointing keeps one layer's working set instead of every layer's.
    without = _estimate(gradient_checkpointing=False).components["activations"]
    assert without > 5 * lora.components["activations"]
    # Activations grow linearly in the batch (attention scores quadratically in the length).
    assert _estimate(batch_size=4).components["activations"] == 2 * lora.components["activations"]
    assert lora.components["logits"] == 256 * SHAPE.vocab * 4 * 3
    capped = estimate_peak(dataclasses.replace(SHAPE, logit_softcap=True), **_estimate_settings())
    assert capped.components["logits"] == 256 * SHAPE.vocab * 4 * 5  # the cap's tanh and slope
    assert lora.fits and not lora.advice
    # An evaluation batch the training one's size adds nothing; a larger one holds one layer of its own
    # size (no grad), which without checkpointing stays below every layer of the training batch.
    assert _estimate(eval_batch_size=2).components == lora.components
    big_eval = _estimate(eval_batch_size=64).components["activations"]
    one_layer_at_64 = _estimate(gradient_checkpointing=False, batch_size=64).components["activations"] // SHAPE.n_layers
    assert big_eval == one_layer_at_64 > lora.components["activations"]
    assert _estimate(gradient_checkpointing=False, eval_batch_size=4).components["activations"] == without


def test_the_estimate_of_a_config_uses_its_head_chunk_and_evaluation_batch(workspace):
    """memory_estimate reads the head's chunk from the model's hidden size and the resolved evaluation
    batch from the config (the tiny model: hidden 64 -> 64 rows)."""
    from dpo_engine.logit_chunks import head_chunk_rows
    from dpo_engine.models.loading import model_directory
    from dpo_engine.train.config import TrainConfig
    from dpo_engine.train.inputs import memory_estimate
    from dpo_engine.train.memory import model_shape

    def config(**monitoring):
        return TrainConfig.model_validate(
            {"data": {"dataset": str(HH_SAMPLE)}, "model": {"name": "tiny-random"}, "monitoring": monitoring}
        )

    cfg = config()
    shape = model_shape(model_directory("tiny-random", workspace=workspace), cfg.model.lora_target_modules)
    estimate = memory_estimate(config(), workspace, "cpu")
    # the default KL regulariser's chunk (the head's rows) holds six copies of the distributions
    assert estimate.components["logits"] == head_chunk_rows(shape.hidden) * shape.vocab * 4 * 6
    assert head_chunk_rows(shape.hidden) == 64
    plain = TrainConfig.model_validate(
        {
            "data": {"dataset": str(HH_SAMPLE)},
            "model": {"name": "tiny-random"},
            "method": {"divergence": {"name": "none"}},
        }
    )
    assert memory_estimate(plain, workspace, "cpu").components["logits"] == 64 * shape.vocab * 4 * 3
    wider = memory_estimate(config(eval_batch_size=512), workspace, "cpu")
    assert wider.components["activations"] > estimate.components["activations"]


def test_a_run_that_cannot_fit_gets_advice():
    estimate = _estimate(lora=False, gradient_checkpointing=False, batch_size=8, max_length=2048, available=8 * GiB)
    assert not estimate.fits
    text = " ".join(estimate.advice)
    assert "LoRA" in text and "checkpointing" in text and "optimisation.batch_size" in text and "max_length" in text


def test_advice_offers_only_changes_that_make_the_run_fit():
    """Each line is checked by estimating again: 4-bit weights alone would not fit here, bf16 is
    already the dtype, so neither is offered; when no single change fits, all of them together are."""
    tight = _estimate(batch_size=8, max_length=1024, available=5 * GiB)
    assert tight.advice == [
        "lower the batch to 4 (optimisation.batch_size 4) and multiply grad_accum by 2",
        "shorten sequences (data.max_length 512)",
    ]
    assert _estimate(batch_size=4, max_length=1024, available=5 * GiB).fits
    wide_eval = _estimate(batch_size=8, max_length=1024, eval_batch_size=16, available=5 * GiB)
    assert wide_eval.advice[0].endswith("with monitoring.eval_batch_size 4")
    assert not _estimate(batch_size=8, max_length=1024, load_in_4bit=True, available=5 * GiB).fits
    fp32 = _estimate(compute_dtype="float32", available=4 * GiB, device="cpu")
    assert fp32.advice == ["use bfloat16 weights (model.dtype bfloat16)"]
    together = _estimate(lora=False, gradient_checkpointing=False, batch_size=8, max_length=2048, available=8 * GiB)
    assert len(together.advice) == 1 and together.advice[0].startswith("all of these together")
    assert _estimate(available=1 * GiB).advice == [
        "use a device with more memory (no change of these settings makes it fit)"
    ]


def _env(workspace):
    return dict(os.environ, DPO_KERNELS_WORKSPACE=str(workspace.root))


@pytest.mark.slow  # a CLI or worker process of its own
def test_dry_run_prints_the_estimate_and_queues_nothing(workspace):
    proc = subprocess.run(
        [*CLI, "train", str(HH_SAMPLE), "--model", "tiny-random", "--dry-run"],
        capture_output=True,
        text=True,
        env=_env(workspace),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["fits"] is True and out["device"] == "cpu"
    assert abs(out["predicted_peak_gib"] - sum(out["components_gib"].values())) < 0.01
    assert JobStore.for_workspace(workspace).list() == []


HUGE = ["--max-length", "8192", "--max-prompt-length", "4096", "--batch-size", "4096", "--no-lora"]


def test_a_job_submitted_for_a_device_waits_for_it_and_is_checked_where_it_is_visible(workspace):
    """--device pins the queued job (a CPU worker will not take a job meant for a GPU); a device this
    machine has is checked before anything is queued; an unknown one is one line."""
    from typer.testing import CliRunner

    from dpo_engine.cli import app

    base = ["train", str(HH_SAMPLE), "--model", "tiny-random", "-w", str(workspace.root)]
    store = JobStore.for_workspace(workspace)
    queued = CliRunner().invoke(app, [*base, "--device", "cuda:7"])  # not on this machine: left to its worker
    assert queued.exit_code == 0, queued.output
    (job,) = store.list()
    assert job.requested_device == "cuda:7" and store.claim("w-cpu", "cpu") is None
    refused = CliRunner().invoke(app, [*base, "--device", "cpu", *HUGE])
    assert refused.exit_code != 0 and "will not fit" in refused.output
    unknown = CliRunner().invoke(app, [*base, "--device", "tpu"])
    assert unknown.exit_code != 0 and "unknown device 'tpu'" in unknown.output
    elsewhere = CliRunner().invoke(app, [*base, "--device", "cuda:7", "--dry-run"])
    assert elsewhere.exit_code != 0 and "device cuda:7 is not on this machine" in elsewhere.output
    assert len(store.list()) == 1


@pytest.mark.slow  # a CLI or worker process of its own
def test_a_run_that_will_not_fit_is_refused_by_the_cli_and_by_the_job(workspace):
    proc = subprocess.run(
        [*CLI, "train", str(HH_SAMPLE), "--model", "tiny-random", "--foreground", *HUGE],
        capture_output=True,
        text=True,
        env=_env(workspace),
        timeout=300,
    )
    assert proc.returncode != 0
    line = proc.stderr.strip().splitlines()[-1]
    assert "will not fit" in line and "optimisation.batch_size" in line, proc.stderr
    submitted = subprocess.run(
        [*CLI, "train", str(HH_SAMPLE), "--model", "tiny-random", *HUGE],
        capture_output=True,
        text=True,
        env=_env(workspace),
        timeout=300,
    )
    assert submitted.returncode == 0, submitted.stderr
    subprocess.run(
        [*CLI, "worker", "--once", "--device", "cpu"], env=_env(workspace), timeout=300, check=True, capture_output=True
    )
    (job,) = JobStore.for_workspace(workspace).list(kind="train")
    assert job.status == "failed" and "will not fit" in job.error.splitlines()[0]


def test_four_bit_weights_are_nf4_for_linear_layers_and_fp32_elsewhere():
    bf16 = _estimate()
    nf4 = _estimate(load_in_4bit=True)
    # 4 bits plus 0.127 bits of double-quantised block constants per linear weight (QLoRA, section 3.1);
    # the rest (embeddings, norms, head) in fp32: peft's prepare_model_for_kbit_training casts them
    assert nf4.components["weights"] == int(800_000_000 * 4.127 / 8) + 200_000_000 * 4
    assert {k: v for k, v in nf4.components.items() if k != "weights"} == {
        k: v for k, v in bf16.components.items() if k != "weights"
    }
    tight = _estimate(available=int(bf16.total * 0.9))
    assert any("model.load_in_4bit" in a for a in tight.advice)


def test_four_bit_loading_is_refused_in_one_line_where_it_cannot_run(workspace):
    from pydantic import ValidationError

    from dpo_engine.train.config import TrainConfig
    from dpo_engine.train.inputs import check_memory

    with pytest.raises(ValidationError, match="load_in_4bit needs model.lora"):
        TrainConfig.model_validate({"data": {"dataset": "x"}, "model": {"lora": False, "load_in_4bit": True}})
    cfg = TrainConfig.model_validate({"data": {"dataset": "x"}, "model": {"name": "tiny-random", "load_in_4bit": True}})
    with pytest.raises(ValueError, match=r"needs an NVIDIA GPU and this run is on cpu"):
        check_memory(cfg, workspace, "cpu")


def test_a_run_that_sees_little_of_its_training_split_says_so():
    from dpo_engine.train.setup import coverage_note

    note = coverage_note(100, 4, 54_000)
    assert note.startswith("note: 100 steps of 4 pairs train on 400 of the 54,000 training pairs (0.7%)")
    assert coverage_note(100, 4, 8_000) is None  # 5 % of the split
    assert coverage_note(100, 4, 300) is None


def test_the_half_precision_advice_is_one_the_gpu_accepts(monkeypatch):
    """A T4 or V100 has no native bfloat16 and `resolve_dtype` refuses it there: the advice says float16."""
    from dpo_engine.models import resolve_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    t4 = _estimate(compute_dtype="float32", available=4 * GiB, device="cuda:0")
    assert "use float16 weights (model.dtype float16)" in t4.advice and not any("bfloat16" in a for a in t4.advice)
    assert resolve_dtype("float16", "cuda:0") == torch.float16  # what the advice names is accepted
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert (
        "use bfloat16 weights (model.dtype bfloat16)"
        in _estimate(compute_dtype="float32", available=4 * GiB, device="cuda:0").advice
    )
