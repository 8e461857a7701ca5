"""What a large model and a large file need, checked on the tiny model: weights stored in the compute
dtype with fp32 adapters, gradient checkpointing resolved from the model's size, the final hidden
state captured without every layer's output, the evaluation cap, and batched tokenisation equal to
one call per text."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from accelerate.state import AcceleratorState
from peft import LoraConfig, get_peft_model

from dpo_engine import rundir
from dpo_engine.data import load_preferences
from dpo_engine.data.tokenize import tokenize_pair, tokenize_pairs
from dpo_engine.models import load_policy
from dpo_engine.train.config import GRADIENT_CHECKPOINTING_MIN_PARAMS, TrainConfig
from dpo_engine.train.data import eval_subset, split_train_eval
from dpo_engine.train.passes import final_hidden_state
from dpo_engine.train.setup import use_gradient_checkpointing, weight_dtype
from dpo_engine.train.step import MAX_FP16_OVERFLOW_STREAK, fp16_overflow_tolerated
from dpo_engine.train.trainer import DPOTrainer, train
from tests.conftest import HH_SAMPLE
from tests.test_train import make_config, toy_pairs


def test_lora_base_weights_are_stored_in_the_compute_dtype_and_adapters_in_fp32(workspace, tmp_path):
    cfg = make_config(model={"lora": True, "lora_r": 4, "dtype": "bfloat16"})
    trainer = DPOTrainer(cfg, tmp_path / "run", workspace=workspace, pairs=toy_pairs(), device="cpu")
    trainer.setup()
    params = dict(trainer.passes.unwrapped().named_parameters())
    adapters = {n: p for n, p in params.items() if "lora_" in n}
    frozen = {n: p for n, p in params.items() if "lora_" not in n}
    assert adapters and all(p.dtype == torch.float32 and p.requires_grad for p in adapters.values())
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in frozen.values())
    assert weight_dtype(torch.bfloat16, lora=False) == torch.float32  # a full fine-tune keeps fp32 masters


def test_full_fine_tune_keeps_fp32_weights_and_an_fp32_reference(workspace, tmp_path):
    cfg = make_config(model={"lora": False, "dtype": "bfloat16"})
    trainer = DPOTrainer(cfg, tmp_path / "run", workspace=workspace, pairs=toy_pairs(), device="cpu")
    trainer.setup()
    assert {p.dtype for p in trainer.passes.unwrapped().parameters()} == {torch.float32}
    # the reference is the policy as it starts, in its dtype (test_train.py: it computes what the policy does)
    assert {p.dtype for p in trainer.parts.ref_model.parameters()} == {torch.float32}


def test_bf16_lora_run_follows_the_fp32_run_within_bf16_tolerance(workspace, tmp_path):
    runs = {}
    for dtype in ("float32", "bfloat16"):
        cfg = make_config(
            model={"lora": True, "lora_r": 4, "dtype": dtype},
            optimisation={"max_steps": 3, "lr": 1e-3},
            monitoring={"eval_every": 3, "snapshot_every": 100},
        )
        summary = train(cfg, tmp_path / dtype, workspace=workspace, pairs=toy_pairs())
        assert summary["status"] == "succeeded", summary["error"]
        AcceleratorState._reset_state()  # one precision per process in accelerate: jobs run one run each
        runs[dtype] = (rundir.read_metrics(tmp_path / dtype), rundir.read_eval(tmp_path / dtype))
    (m32, e32), (m16, e16) = runs["float32"], runs["bfloat16"]
    # bf16 keeps 8 significand bits (relative rounding 2**-8 ≈ 0.4 %); a few steps of a tiny model
    # accumulate a few of those roundings
    np.testing.assert_allclose(m16["loss"], m32["loss"], rtol=0.02)
    np.testing.assert_allclose(m16["grad_norm"], m32["grad_norm"], rtol=0.05)
    np.testing.assert_allclose(e16["loss_pref"], e32["loss_pref"], rtol=0.02)


def test_gradient_checkpointing_auto_follows_the_model_size():
    assert use_gradient_checkpointing("auto", GRADIENT_CHECKPOINTING_MIN_PARAMS)
    assert not use_gradient_checkpointing("auto", GRADIENT_CHECKPOINTING_MIN_PARAMS - 1)
    assert use_gradient_checkpointing("on", 1) and not use_gradient_checkpointing("off", 10**12)
    base = make_config().model_dump()
    for old, new in ((True, "on"), (False, "off")):  # config.json files written before "auto"
        base["model"]["gradient_checkpointing"] = old
        assert TrainConfig.model_validate(base).model.gradient_checkpointing == new
    assert make_config(model={"gradient_checkpointing": "auto"}).model.gradient_checkpointing == "auto"
    with pytest.raises(ValueError):
        make_config(model={"gradient_checkpointing": "sometimes"})


def test_final_hidden_state_is_the_models_last_hidden_state_with_and_without_lora(workspace):
    model, _ = load_policy("tiny-random", workspace=workspace, dtype="float32")
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    for candidate in (model, get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))):
        with torch.no_grad(), final_hidden_state(candidate) as captured:
            out = candidate(input_ids=ids, output_hidden_states=True)
        assert len(captured) == 1
        torch.testing.assert_close(captured[0], out.hidden_states[-1], rtol=0, atol=0)


def test_eval_subset_is_seeded_capped_and_held_out():
    train_idx, held_out = split_train_eval(1000, eval_fraction=0.2, min_eval_pairs=8, seed=3)
    subset = eval_subset(held_out, 50, seed=3)
    assert len(subset) == 50 and np.all(np.diff(subset) > 0)
    assert set(subset) <= set(held_out) and not set(subset) & set(train_idx)
    np.testing.assert_array_equal(subset, eval_subset(held_out, 50, seed=3))
    assert not np.array_equal(subset, eval_subset(held_out, 50, seed=4))
    np.testing.assert_array_equal(eval_subset(held_out, None, seed=3), held_out)
    np.testing.assert_array_equal(eval_subset(held_out, 10_000, seed=3), held_out)


def test_a_run_evaluates_the_same_capped_subset_at_every_eval(workspace, tmp_path):
    pairs = toy_pairs(120)
    cfg = make_config(
        data={"eval_fraction": 0.5},
        optimisation={"max_steps": 2},
        monitoring={"eval_every": 1, "eval_max_pairs": 12, "probe_pairs": 4, "snapshot_every": 100},
    )
    summary = train(cfg, tmp_path / "run", workspace=workspace, pairs=pairs)
    assert summary["status"] == "succeeded", summary["error"]
    margins = [row["pair_ids"] for row in rundir.read_jsonl(tmp_path / "run" / rundir.EVAL_MARGINS)]
    assert len(margins) == 3 and all(ids == margins[0] for ids in margins) and len(margins[0]) == 12
    _, held_out = split_train_eval(len(pairs), eval_fraction=0.5, min_eval_pairs=8, seed=cfg.optimisation.seed)
    assert set(margins[0]) <= set(pairs["pair_id"].iloc[held_out])


def test_batched_tokenisation_equals_one_call_per_text(workspace):
    _, tokenizer = load_policy("tiny-random", workspace=workspace, dtype="float32")
    table = load_preferences(HH_SAMPLE).table.iloc[:300]
    table = pd.concat([table, table.iloc[:1].assign(pair_id="empty-ish", chosen=" ", rejected="x")])
    batched = tokenize_pairs(tokenizer, table, max_length=96, max_prompt_length=48, chunk=64)  # several chunks
    one_by_one = [
        tokenize_pair(tokenizer, r.pair_id, r.prompt, r.chosen, r.rejected, max_length=96, max_prompt_length=48)
        for r in table.itertuples(index=False)
    ]
    assert batched == one_by_one


def test_fp16_overflow_is_a_skipped_step_until_too_many_in_a_row():
    scaled, unscaled = SimpleNamespace(scaler=object()), SimpleNamespace(scaler=None)
    assert fp16_overflow_tolerated(scaled, 0) and fp16_overflow_tolerated(scaled, MAX_FP16_OVERFLOW_STREAK - 1)
    assert not fp16_overflow_tolerated(scaled, MAX_FP16_OVERFLOW_STREAK)
    assert not fp16_overflow_tolerated(unscaled, 0)  # bf16 and fp32 have no scaler: inf means diverged


def test_automatic_eval_cadence_grows_with_the_run():
    """About twenty evaluations a run, at least ten steps apart and far enough apart that evaluating
    costs at most about a fifth of the training between them; snapshots at every second one;
    explicit values kept."""
    from dpo_engine.train.config import (
        EVAL_EVERY_AUTO_MIN,
        EVAL_SHARE_AUTO,
        EVALS_PER_RUN_AUTO,
        FORWARD_SHARE_OF_STEP,
        MonitoringConfig,
    )

    auto = MonitoringConfig()
    assert auto.cadence(100) == (EVAL_EVERY_AUTO_MIN, 2 * EVAL_EVERY_AUTO_MIN)  # nothing to evaluate: the floor
    every, snap = auto.cadence(13_500, eval_pairs=512, pairs_per_step=4)  # one epoch of 54k pairs at batch 4
    assert every == 13_500 // EVALS_PER_RUN_AUTO and snap == 2 * every
    assert 13_500 // every == EVALS_PER_RUN_AUTO
    # 512 eval pairs against 4 pairs a step: one evaluation costs as much as ~43 steps, so >= ~213 steps apart
    every, _ = auto.cadence(200, eval_pairs=512, pairs_per_step=4)
    assert every > 200  # a 200-step run evaluates at step 0 and the end only
    for pairs, per_step in ((512, 4), (64, 2), (40, 16), (2000, 32)):
        every, _ = auto.cadence(1000, eval_pairs=pairs, pairs_per_step=per_step)
        cost = pairs * FORWARD_SHARE_OF_STEP / (every * per_step)  # evaluation's cost per training between two
        assert cost <= EVAL_SHARE_AUTO + 1e-9
        assert every == EVAL_EVERY_AUTO_MIN or every == 1000 // EVALS_PER_RUN_AUTO or cost > 0.9 * EVAL_SHARE_AUTO
    assert MonitoringConfig(eval_every=3, snapshot_every=7).cadence(13_500) == (3, 7)
