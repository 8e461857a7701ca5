"""Trainer behaviour on the tiny random Llama: learning, exact resume, the NaN guard, step-0 identities."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from dpo_engine import rundir
from dpo_engine.train.config import TrainConfig
from dpo_engine.train.trainer import train
from tests.helpers import deep_merge


def toy_pairs(n: int = 40) -> pd.DataFrame:
    """Separable: the chosen answer is always one fixed sentence, the rejected another."""
    return pd.DataFrame(
        {
            "pair_id": [f"p{i}" for i in range(n)],
            "prompt": [f"Question {i}: is the sky blue?" for i in range(n)],
            "chosen": ["Yes, it is blue."] * n,
            "rejected": ["No idea, go away."] * n,
        }
    )


def make_config(**groups) -> TrainConfig:
    base = {
        "data": {"dataset": "toy", "min_eval_pairs": 8, "max_length": 48, "max_prompt_length": 32},
        "model": {"name": "tiny-random", "lora": False},
        "method": {
            "kernel": {"name": "none"},
            "divergence": {"name": "none"},
            "loss": {"gamma": 0.0},
            "calibration_pairs": 16,
        },
        "optimisation": {"max_steps": 6, "batch_size": 4, "lr": 1e-3, "warmup_ratio": 0.0},
        "monitoring": {
            "eval_every": 3,
            "snapshot_every": 3,
            "checkpoint_every": 100,
            "probe_pairs": 8,
            "htsr": False,
            "eval_divergences": False,
        },
    }
    for group, values in groups.items():
        base[group] = deep_merge(base.get(group, {}), values)
    return TrainConfig.model_validate(base)


def test_loss_decreases_on_separable_pairs(workspace, tmp_path):
    cfg = make_config(optimisation={"max_steps": 6}, monitoring={"snapshot_every": 100})
    summary = train(cfg, tmp_path / "run", workspace=workspace, pairs=toy_pairs())
    assert summary["status"] == "succeeded", summary["error"]
    evals = rundir.read_eval(tmp_path / "run")
    assert list(evals["step"]) == [0, 3, 6]
    assert evals["loss_pref"].iloc[-1] < 0.65 * evals["loss_pref"].iloc[0]
    assert evals["reward_acc"].iloc[-1] == 1.0
    metrics = rundir.read_metrics(tmp_path / "run")
    assert metrics["loss"].iloc[-3:].mean() < metrics["loss"].iloc[:3].mean()


def test_step0_eval_policy_equals_reference(workspace, tmp_path):
    """With LoRA the adapters start at zero, so the policy is the reference: L_pref = log 2, divergences 0."""
    cfg = make_config(
        data={"min_eval_pairs": 4},
        model={"lora": True},
        method={"divergence": {"name": "kl"}},
        optimisation={"max_steps": 1},
        monitoring={"eval_divergences": True},
    )
    summary = train(cfg, tmp_path / "run", workspace=workspace, pairs=toy_pairs())
    assert summary["status"] == "succeeded", summary["error"]
    first = rundir.read_eval(tmp_path / "run").iloc[0]
    assert first["step"] == 0
    assert first["loss_pref"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["reward_chosen"] == pytest.approx(0.0, abs=1e-6)
    assert first["hybrid_acc"] == 0.0
    for key in ("div_kl", "div_js", "div_hellinger", "div_renyi", "div_bhattacharyya", "div_fdiv"):
        assert abs(first[key]) < 1e-5, key
    assert abs(first["div_wasserstein"]) < 1e-3


def test_resume_reproduces_uninterrupted_run(workspace, tmp_path):
    """Stop after step 3, resume from the step-2 checkpoint: every later row equals the uninterrupted run's."""
    groups = dict(
        model={"lora": True, "lora_dropout": 0.1},
        method={"kernel": {"name": "hmk"}, "divergence": {"name": "kl"}, "loss": {"gamma": 0.5, "epsilon_dpo": 0.05}},
        optimisation={"max_steps": 5},
        monitoring={"checkpoint_every": 2, "eval_every": 2, "snapshot_every": 3},
    )
    full = tmp_path / "full"
    assert train(make_config(**groups), full, workspace=workspace, pairs=toy_pairs())["status"] == "succeeded"

    cut = tmp_path / "cut"

    def stop_after_three() -> bool:
        return len(rundir.read_jsonl(cut / rundir.METRICS)) >= 3

    first = train(make_config(**groups), cut, workspace=workspace, pairs=toy_pairs(), should_stop=stop_after_three)
    assert first["status"] == "cancelled"
    assert len(rundir.read_metrics(cut)) == 3  # step 3 was written after the step-2 checkpoint
    assert rundir.latest_checkpoint(cut).name == "step_2"
    second = train(make_config(**groups), cut, workspace=workspace, pairs=toy_pairs())
    assert second["status"] == "succeeded", second["error"]

    a, b = rundir.read_metrics(full), rundir.read_metrics(cut)
    assert list(a["step"]) == list(b["step"]) == list(range(1, 6))
    cols = [c for c in a.columns if c != "tokens_per_s"]
    np.testing.assert_allclose(b[cols].to_numpy(float), a[cols].to_numpy(float), rtol=1e-5, atol=1e-6)
    assert a["beta"].nunique() > 1  # epsilon-DPO moved beta, and the resumed run followed it
    ea, eb = rundir.read_eval(full), rundir.read_eval(cut)
    assert list(ea["step"]) == list(eb["step"])
    np.testing.assert_allclose(
        eb.drop(columns="step").to_numpy(float),
        ea.drop(columns="step").to_numpy(float),
        rtol=1e-4,
        atol=1e-5,
        equal_nan=True,
    )


def test_nan_guard_stops_with_clear_message(workspace, tmp_path):
    cfg = make_config(optimisation={"max_steps": 5, "lr": 1e10, "max_grad_norm": 1e12})
    summary = train(cfg, tmp_path / "run", workspace=workspace, pairs=toy_pairs())
    assert summary["status"] == "failed"
    err = summary["error"]
    assert "diverged at step" in err and "not finite" in err
    assert "lower learning rate" in err and "float32" in err and "smaller beta" in err
    assert rundir.read_summary(tmp_path / "run")["status"] == "failed"
    assert summary["steps_completed"] < 5


def test_bad_dataset_is_refused(workspace, tmp_path):
    bad = toy_pairs().drop(columns=["rejected"])
    with pytest.raises(ValueError, match="rejected"):
        train(make_config(), tmp_path / "run", workspace=workspace, pairs=bad)
    assert rundir.read_summary(tmp_path / "run")["status"] == "failed"


@pytest.mark.real_model
def test_smollm2_lora_few_steps_on_hh(workspace, tmp_path, hh_sample_path):
    """The real policy with LoRA on 16 HH pairs: a few steps run, adapters are saved, numbers are finite."""
    cfg = make_config(
        data={
            "dataset": str(hh_sample_path),
            "max_pairs": 16,
            "min_eval_pairs": 4,
            "max_length": 96,
            "max_prompt_length": 48,
        },
        model={"name": "smollm2-135m-instruct", "lora": True},
        method={"kernel": {"name": "hmk"}, "divergence": {"name": "kl"}, "loss": {"gamma": 0.5}},
        optimisation={"max_steps": 2, "batch_size": 2, "lr": 5e-4},
        monitoring={"eval_every": 2, "snapshot_every": 2, "probe_pairs": 4, "htsr": True, "eval_divergences": False},
    )
    summary = train(cfg, tmp_path / "run", workspace=workspace)
    assert summary["status"] == "succeeded", summary["error"]
    evals = rundir.read_eval(tmp_path / "run")
    assert evals["loss_pref"].iloc[0] == pytest.approx(math.log(2), abs=0.2)  # gamma > 0: log 2 up to the kernel term
    assert np.isfinite(rundir.read_metrics(tmp_path / "run")[["loss", "grad_norm"]].to_numpy()).all()
    assert (tmp_path / "run" / "model" / "adapter_model.safetensors").is_file()
    assert rundir.load_snapshot(tmp_path / "run", 2)["chosen"].shape == (4, 256)


def assert_full_fine_tunes_reference_is_the_policy(workspace, tmp_path, dtype: str, device: str) -> None:
    """The step-0 evaluation takes the reference's outputs for the policy's. A full fine-tune's frozen
    copy must compute exactly what the fp32 policy does under autocast: a copy in the compute dtype
    would round the embeddings, norms and residual stream that autocast keeps in fp32."""
    from dpo_engine.train.monitoring import TimeSplit
    from dpo_engine.train.passes import ModelPasses
    from dpo_engine.train.setup import build_parts, make_accelerator
    from tests.test_train_speed_paths import varied_pairs

    cfg = make_config(model={"lora": False, "dtype": dtype}, optimisation={"reference_cache": False})
    accelerator, compute = make_accelerator(cfg, device)
    (tmp_path / "run").mkdir()
    parts = build_parts(
        cfg, tmp_path / "run", workspace, accelerator, compute, pairs=varied_pairs(40), timer=TimeSplit(), log=print
    )
    passes = ModelPasses.from_parts(parts)
    batch = passes.collate([parts.eval_pairs[i] for i in range(4)])
    with torch.no_grad():
        policy = passes.policy_pass(batch, pool=False).logps
    reference = passes.reference_pass(batch).logps
    assert torch.equal(policy, reference), (policy - reference).abs().max()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_full_fine_tunes_reference_computes_what_the_policy_does_before_any_update(workspace, tmp_path, dtype):
    """bfloat16 autocast on the CPU rounds as on a GPU: the check runs here too."""
    assert_full_fine_tunes_reference_is_the_policy(workspace, tmp_path, dtype, "cpu")
