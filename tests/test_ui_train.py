"""Train page: the form is generated from TrainConfig, prefilled from the diagnosis, validated, and submits a job."""

from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

from dpo_engine.jobs import JobStore
from dpo_engine.schema import leaf_settings
from dpo_engine.train.config import TrainConfig

PAGE = str(Path(__file__).resolve().parent.parent / "pages" / "train.py")


def _page(recommendation=None) -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=60)
    if recommendation:
        at.session_state["recommendation"] = recommendation
    return at.run()


def _widget(at, label):
    for kind in (at.selectbox, at.number_input, at.text_input, at.checkbox):
        for w in kind:
            if w.label.split(" ⭐")[0] == label:
                return w
    raise AssertionError(f"no widget labelled {label!r}")


def test_no_dataset_says_where_to_add_one(workspace):
    at = _page()
    assert not at.exception
    assert any("No datasets yet" in i.value for i in at.info)


def test_form_has_a_widget_for_every_config_field(workspace):
    from dpo_engine.data.store import ensure_sample_dataset

    ensure_sample_dataset(workspace)
    at = _page()
    assert not at.exception
    keys = {w.key for kind in (at.selectbox, at.number_input, at.text_input, at.checkbox) for w in kind}
    expected = {f"train.{spec.path}" for spec in leaf_settings(TrainConfig)}
    assert expected <= keys, expected - keys
    subheaders = [s.value for s in at.subheader]
    assert subheaders[:5] == ["Data", "Model", "Method", "Optimisation", "Monitoring"]
    # defaults are visible and help texts come from the field descriptions
    beta = next(w for w in at.number_input if w.key == "train.method.loss.beta")
    assert beta.value == 0.1 and "Default: 0.1" in beta.help
    assert _widget(at, "lora").value is True


def test_every_form_field_and_its_cli_flag_say_the_same(workspace):
    from dpo_engine.cli.train_cmd import config_flags
    from dpo_engine.data.store import ensure_sample_dataset

    ensure_sample_dataset(workspace)
    at = _page()
    helps = {w.key: w.help for kind in (at.selectbox, at.number_input, at.text_input, at.checkbox) for w in kind}
    flags = config_flags()
    assert len(flags) > 40
    for flag in flags:
        form_help = helps[f"train.{flag.path}"].removesuffix(" Separate entries with commas.")
        assert form_help == flag.help, flag.path


def test_recommendation_prefills_and_is_marked(workspace):
    from dpo_engine.data.store import ensure_sample_dataset

    info = ensure_sample_dataset(workspace)
    at = _page({"kernel": "rbf", "divergence": "hellinger", "dataset_id": info.id, "source": "diagnose-xyz"})
    assert not at.exception
    kernel = next(w for w in at.selectbox if w.key == "train.method.kernel.name")
    divergence = next(w for w in at.selectbox if w.key == "train.method.divergence.name")
    assert (kernel.value, divergence.value) == ("rbf", "hellinger")
    assert "⭐" in kernel.label and "⭐" in divergence.label
    assert any("recommended by diagnosis diagnose-xyz" in c.value for c in at.caption)


def test_invalid_settings_are_shown_next_to_the_form_and_nothing_is_queued(workspace):
    from dpo_engine.data.store import ensure_sample_dataset

    ensure_sample_dataset(workspace)
    at = _page()
    next(w for w in at.selectbox if w.key == "train.method.kernel.name").set_value("none")
    next(w for w in at.text_input if w.key == "train.data.max_pairs").set_value("many")
    at.button[0].click().run()
    assert not at.exception
    errors = " ".join(e.value for e in at.error)
    assert "gamma > 0 needs a kernel" in errors
    assert "max_pairs" in errors and "integer" in errors
    assert JobStore.for_workspace(workspace).list(kind="train") == []


def test_submit_queues_a_train_job_with_the_form_values(workspace):
    from dpo_engine.data.store import ensure_sample_dataset

    info = ensure_sample_dataset(workspace)
    at = _page()
    next(w for w in at.text_input if w.key == "train.model.name").set_value("tiny-random")
    next(w for w in at.number_input if w.key == "train.optimisation.batch_size").set_value(2)
    next(w for w in at.text_input if w.key == "train-title").set_value("from the form")
    at.button[0].click().run()
    assert not at.exception
    jobs = JobStore.for_workspace(workspace).list(kind="train")
    assert len(jobs) == 1
    config = TrainConfig.model_validate(jobs[0].params)
    assert config.data.dataset == info.id and config.model.name == "tiny-random"
    assert config.optimisation.batch_size == 2 and jobs[0].title == "from the form"
    assert at.session_state["run_id"] == jobs[0].run_id


def test_quick_preset_fills_the_form_and_is_queued_as_shown(workspace):
    from dpo_engine.data.store import ensure_sample_dataset
    from dpo_engine.train.presets import PRESETS

    ensure_sample_dataset(workspace)
    at = _page()
    at.radio(key="train-preset").set_value("quick").run()
    assert not at.exception
    lora_r = next(w for w in at.number_input if w.key == "train-quick.model.lora_r")
    assert lora_r.value == PRESETS["quick"]["model.lora_r"]
    assert next(w for w in at.text_input if w.key == "train-quick.model.name").value == "smollm2-135m-instruct"
    lora_r.set_value(4)  # still editable: the edit wins over the preset
    at.button[0].click().run()
    assert not at.exception
    (job,) = JobStore.for_workspace(workspace).list(kind="train")
    config = TrainConfig.model_validate(job.params)
    assert config.model.lora_r == 4 and config.model.name == "smollm2-135m-instruct"
    assert config.data.max_length == PRESETS["quick"]["data.max_length"]
    assert config.optimisation.max_steps == PRESETS["quick"]["optimisation.max_steps"]


def test_a_model_directory_without_a_model_is_refused_before_queueing(workspace, tmp_path):
    from dpo_engine.data.store import ensure_sample_dataset

    ensure_sample_dataset(workspace)
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    at = _page()
    next(w for w in at.text_input if w.key == "train.model.name").set_value(str(empty))
    at.button[0].click().run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert any(e.startswith("Not queued:") and "config.json" in e and "\n" not in e for e in errors), errors
    assert JobStore.for_workspace(workspace).list(kind="train") == []
