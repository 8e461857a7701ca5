"""TrainConfig: defaults written out, validation messages, files and overrides, the CLI mapping."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from dpo_engine.train.config import FULL_FINETUNE_DEFAULT_LR, LORA_DEFAULT_LR, TrainConfig


def test_defaults_resolved_and_described():
    cfg = TrainConfig.model_validate({"data": {"dataset": "d"}})
    out = cfg.resolved()
    assert out["optimisation"]["lr"] == LORA_DEFAULT_LR and out["optimisation"]["max_steps"] == 100
    assert out["method"]["kernel"]["name"] == "hmk" and out["method"]["loss"]["beta"] == 0.1
    assert TrainConfig.model_validate(out) == cfg  # config.json round-trips
    no_lora = TrainConfig.model_validate({"data": {"dataset": "d"}, "model": {"lora": False}})
    assert no_lora.optimisation.lr == FULL_FINETUNE_DEFAULT_LR
    from dpo_engine.train.config import DataConfig, ModelConfig, MonitoringConfig, OptimConfig

    for group in (DataConfig, ModelConfig, MonitoringConfig, OptimConfig):
        for name, field in group.model_fields.items():
            assert field.description, f"{group.__name__}.{name} has no help text"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"method": {"kernel": {"name": "none"}, "loss": {"gamma": 0.5}}}, "gamma > 0 needs a kernel"),
        ({"model": {"name": "no-such-model"}}, "unknown model 'no-such-model'"),
        ({"optimisation": {"max_steps": 5, "epochs": 2}}, "exactly one of"),
        ({"data": {"dataset": "d", "max_length": 64, "max_prompt_length": 64}}, "max_prompt_length"),
        ({"optimisation": {"batch_size": 0}}, "batch_size"),
    ],
)
def test_validation_messages(raw, message):
    raw = {"data": {"dataset": "d"}, **raw}
    with pytest.raises(ValidationError, match=message):
        TrainConfig.model_validate(raw)


def test_epochs_alone_replaces_default_steps():
    cfg = TrainConfig.model_validate({"data": {"dataset": "d"}, "optimisation": {"epochs": 2}})
    assert cfg.optimisation.max_steps is None and cfg.optimisation.epochs == 2


def test_from_file_json_yaml_and_overrides(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"data": {"dataset": "d"}, "method": {"loss": {"beta": 0.3}}}))
    (tmp_path / "c.yaml").write_text("data:\n  dataset: d\nmethod:\n  loss:\n    beta: 0.3\n")
    a = TrainConfig.from_file(tmp_path / "c.json", **{"optimisation.lr": 1e-4})
    b = TrainConfig.from_file(tmp_path / "c.yaml", **{"optimisation.lr": 1e-4})
    assert a == b and a.method.loss.beta == 0.3 and a.optimisation.lr == 1e-4
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        TrainConfig.from_file(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError):
        TrainConfig.from_file(tmp_path / "missing.json")


def test_cli_flags_override_config(tmp_path):
    from dpo_engine.cli.train_cmd import build_config

    (tmp_path / "c.json").write_text(json.dumps({"data": {"dataset": "x"}, "method": {"loss": {"beta": 0.3}}}))
    cfg = build_config(
        "ds",
        tmp_path / "c.json",
        kernel="rbf",
        beta=0.2,
        epochs=1.5,
        lora=False,
        htsr="off",
        divergence="js",
        alpha=0.05,
        max_steps=None,
    )
    assert cfg.data.dataset == "ds" and cfg.method.kernel.name == "rbf" and cfg.method.loss.beta == 0.2
    assert cfg.optimisation.epochs == 1.5 and cfg.optimisation.max_steps is None
    assert cfg.model.lora is False and cfg.monitoring.htsr == "off"
    assert cfg.method.divergence.name == "js" and cfg.method.divergence.alpha == 0.05


def test_htsr_plan_follows_the_setting_the_size_and_the_process_count():
    from dpo_engine.train.config import HTSR_AUTO_MAX_PARAMS, MonitoringConfig
    from dpo_engine.train.monitoring import HTSR_AT_END, HTSR_IN_RUN, HTSR_SKIPPED, htsr_plan

    small, large = HTSR_AUTO_MAX_PARAMS - 1, HTSR_AUTO_MAX_PARAMS
    assert htsr_plan("auto", small, 1) == (HTSR_IN_RUN, "")
    plan, why = htsr_plan("auto", large, 1)
    assert plan == HTSR_SKIPPED and "HT-SR job on the saved model" in why
    assert htsr_plan("on", large, 1)[0] == HTSR_IN_RUN
    assert htsr_plan("on", small, 2)[0] == HTSR_AT_END and htsr_plan("auto", small, 4)[0] == HTSR_AT_END
    assert htsr_plan("off", small, 1)[0] == HTSR_SKIPPED
    plan, why = htsr_plan("on", small, 1, four_bit=True)  # packed NF4 bytes are no weight matrix
    assert plan == HTSR_SKIPPED and "model.load_in_4bit" in why
    # configs written before auto existed said true or false
    assert MonitoringConfig(htsr=True).htsr == "on" and MonitoringConfig(htsr=False).htsr == "off"
    assert MonitoringConfig().htsr == "auto"
