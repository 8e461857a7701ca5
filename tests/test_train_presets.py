"""Presets are named settings of the one TrainConfig: the CLI and the form fill them in, explicit values win."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dpo_engine.cli.train_cmd import build_config
from dpo_engine.train.config import TrainConfig
from dpo_engine.train.presets import PRESETS, apply_preset, preset_overrides


def _get(config: TrainConfig, dotted: str):
    node = config.model_dump(mode="json")
    for key in dotted.split("."):
        node = node[key]
    return node


def test_quick_preset_sets_every_named_setting_and_validates(hh_sample_path):
    config = TrainConfig.model_validate(apply_preset({"data": {"dataset": str(hh_sample_path)}}, "quick"))
    for dotted, value in PRESETS["quick"].items():
        assert _get(config, dotted) == value, dotted
    assert config.model.name == "smollm2-135m-instruct"  # the real bundled policy, not the test model
    assert (
        config.method.kernel.name == "hmk"
        and config.optimisation.max_steps == PRESETS["quick"]["optimisation.max_steps"]
    )


def test_flags_override_the_preset_and_the_preset_overrides_the_file(tmp_path, hh_sample_path):
    config_file = tmp_path / "c.json"
    config_file.write_text(json.dumps({"data": {"dataset": "x"}, "model": {"lora_r": 4}, "optimisation": {"lr": 0.1}}))
    cfg = build_config(str(hh_sample_path), config_file, preset="quick", model="tiny-random", max_steps=3)
    assert cfg.model.name == "tiny-random" and cfg.optimisation.max_steps == 3  # flags win
    assert cfg.model.lora_r == PRESETS["quick"]["model.lora_r"]  # the preset wins over the file
    assert cfg.optimisation.lr == PRESETS["quick"]["optimisation.lr"]
    assert build_config(str(hh_sample_path), None).model.lora_r == 8  # no preset: TrainConfig's defaults


def test_unknown_preset_is_one_line(hh_sample_path):
    with pytest.raises(ValueError, match="unknown preset 'fast': use one of quick"):
        preset_overrides("fast")


def test_cli_preset_writes_the_preset_into_the_queued_config(workspace, hh_sample_path):
    from dpo_engine.cli import app
    from dpo_engine.jobs import JobStore

    result = CliRunner().invoke(
        app,
        [
            "train",
            str(hh_sample_path),
            "--preset",
            "quick",
            "--model",
            "tiny-random",
            "--workspace",
            str(workspace.root),
        ],
    )
    assert result.exit_code == 0, result.output
    (job,) = JobStore.for_workspace(workspace).list(kind="train")
    assert (
        job.params["model"]["lora_r"] == 16 and job.params["data"]["max_length"] == PRESETS["quick"]["data.max_length"]
    )
    assert job.params["model"]["name"] == "tiny-random"
    bad = CliRunner().invoke(
        app, ["train", str(hh_sample_path), "--preset", "fast", "--workspace", str(workspace.root)]
    )
    assert bad.exit_code == 2 and "unknown preset 'fast'" in bad.output and "Traceback" not in bad.output
