"""`--help` of every command shows each option's default, and train's flags come from TrainConfig."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from dpo_engine.cli import app


def _commands(command, path=()):
    subcommands = getattr(command, "commands", None)
    if subcommands:
        for name, sub in subcommands.items():
            yield from _commands(sub, (*path, name))
    else:
        yield path, command


ALL_COMMANDS = list(_commands(typer.main.get_command(app)))


@pytest.mark.parametrize("path, command", ALL_COMMANDS, ids=[" ".join(p) for p, _ in ALL_COMMANDS])
def test_every_option_states_its_default(path, command):
    help_text = CliRunner().invoke(app, [*path, "--help"]).output
    for param in command.params:
        if param.param_type_name != "option" or param.is_flag or param.required or param.name == "help":
            continue
        shows = bool(param.show_default) and param.default not in (None, [], ())
        said = "default" in (param.help or "").lower()
        assert shows or said, f"{' '.join(path)} {param.opts[0]} does not state its default"
        assert param.opts[0] in help_text


def _leaf_paths(model, prefix=""):
    from pydantic import BaseModel

    for name, info in model.model_fields.items():
        annotation = info.annotation
        args = getattr(annotation, "__args__", ())
        inner = next((a for a in (annotation, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if inner is not None:
            yield from _leaf_paths(inner, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", info


def test_train_has_one_flag_per_config_setting_with_its_description_and_default():
    from dpo_engine.cli.train_cmd import config_flags
    from dpo_engine.train.config import TrainConfig

    leaves = dict(_leaf_paths(TrainConfig))
    flags = {f.path: f for f in config_flags()}
    assert set(flags) == set(leaves) - {"data.dataset"}
    help_text = " ".join(CliRunner().invoke(app, ["train", "--help"], terminal_width=200).output.split())
    for path, info in leaves.items():
        if path == "data.dataset":
            continue
        flag = flags[path]
        assert flag.flag in help_text, flag.flag
        assert (info.description or "").split(";")[0].split("(")[0].strip()[:30] in help_text, path
    assert re.search(r"--max-steps .*?Default: 100\.", help_text)
    assert re.search(r"--scheduler .*?Allowed: cosine, linear, constant\. Default: cosine\.", help_text)
    assert re.search(r"--beta .*?Allowed: number > 0\. Default: 0\.1\.", help_text)
    for short in ("--model", "--kernel", "--divergence", "--lora / --no-lora", "--epsilon-dpo"):
        assert short in help_text


def test_train_flags_reach_the_submitted_config(workspace, tmp_path):
    from dpo_engine.jobs import JobStore

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(f'{{"prompt": "q{i}", "chosen": "good {i}", "rejected": "bad {i}"}}\n' for i in range(8)))
    res = CliRunner().invoke(
        app,
        [
            "train",
            str(data),
            "--model",
            "tiny-random",
            "--scheduler",
            "linear",
            "--lora-target-modules",
            "q_proj, v_proj",
            "--htsr",
            "off",
            "--sigma",
            "2.5",
            "--divergence-f",
            "chi2",
            "--workspace",
            str(workspace.root),
        ],
    )
    assert res.exit_code == 0, res.output
    job = JobStore.for_workspace(workspace).list()[0]
    assert job.params["optimisation"]["scheduler"] == "linear"
    assert job.params["model"]["lora_target_modules"] == ["q_proj", "v_proj"]
    assert job.params["monitoring"]["htsr"] == "off"
    assert job.params["method"]["kernel"]["sigma"] == 2.5
    assert job.params["method"]["divergence"]["f"] == "chi2"
    assert job.params["data"]["dataset"] == str(data.resolve())
