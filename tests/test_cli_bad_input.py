"""Every CLI command meets bad input with one line, exit status 2 and nothing written: no traceback.

The matrix walks each command with the inputs a newcomer gets wrong: wrong or missing columns, a
binary or empty file, truncated JSON/JSONL, a directory that is not a model (policy and embedder),
malformed --config (JSON and YAML), out-of-range numbers, unknown dataset/run/job ids and paths
outside the workspace. The commands run in-process (typer's CliRunner), so a test fails on any
exception that escapes, and a rejected `train` must leave no run directory and no job behind.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from dpo_engine.cli import app

GOOD_ROWS = [
    {"prompt": f"question {i}?", "chosen": f"a helpful answer {i}", "rejected": f"a poor answer {i}"} for i in range(12)
]


@pytest.fixture
def files(tmp_path):
    """Bad (and one good) input files, by name."""
    out = {}

    def write(name, text=None, data=None):
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        else:
            path.write_text(text)
        out[name.split(".")[0]] = path

    write("good.jsonl", "".join(json.dumps(r) + "\n" for r in GOOD_ROWS))
    write(
        "wrongcols.jsonl",
        "".join(json.dumps({"question": r["prompt"], "answer": r["chosen"]}) + "\n" for r in GOOD_ROWS),
    )
    write("wrongcols_csv.csv", "question,answer\nq,a\nq2,a2\n")
    write("binary.jsonl", data=bytes(range(256)) * 8)
    write("empty.jsonl", "")
    write("truncated_jsonl.jsonl", json.dumps(GOOD_ROWS[0]) + "\n" + '{"prompt": "half a row", "chos')
    write("truncated_json.json", json.dumps(GOOD_ROWS)[:-40])
    write("badgz.jsonl.gz", data=gzip.compress(b"")[:6])
    write("bad_config.json", '{"optimisation": {"max_steps": 3,,}')
    write("bad_config_yaml.yaml", "optimisation:\n  max_steps: [3\n  lr: : :\n")
    write("config_list.yaml", "- just\n- a list\n")
    write("config_unknown.yaml", "optimisation:\n  max_stepz: 3\n")
    notmodel = tmp_path / "not_a_model"
    notmodel.mkdir()
    (notmodel / "readme.txt").write_text("no weights here")
    out["not_a_model"] = notmodel
    out["missing"] = tmp_path / "does_not_exist.jsonl"
    return out


def _cases():
    """(case id, argv builder taking (files, workspace root, outside dir)) for every command."""
    T = ["--model", "tiny-random", "--max-steps", "2"]
    cases = {
        # data add
        "data-add wrong columns": lambda f, w, o: ["data", "add", f["wrongcols"]],
        "data-add wrong csv columns": lambda f, w, o: ["data", "add", f["wrongcols_csv"]],
        "data-add binary": lambda f, w, o: ["data", "add", f["binary"]],
        "data-add empty": lambda f, w, o: ["data", "add", f["empty"]],
        "data-add truncated json": lambda f, w, o: ["data", "add", f["truncated_json"]],
        "data-add broken gzip": lambda f, w, o: ["data", "add", f["badgz"]],
        "data-add missing file": lambda f, w, o: ["data", "add", f["missing"]],
        "data-add directory": lambda f, w, o: ["data", "add", f["not_a_model"]],
        "data-add bad map": lambda f, w, o: ["data", "add", f["good"], "--map", "prompt"],
        "data-add negative max-chars": lambda f, w, o: ["data", "add", f["good"], "--max-chars", "-1"],
        "data-add unknown format": lambda f, w, o: ["data", "add", f["good"], "--format", "xlsx"],
        "data-show unknown": lambda f, w, o: ["data", "show", "nope"],
        "data-delete unknown": lambda f, w, o: ["data", "delete", "nope"],
        "data-export unknown": lambda f, w, o: ["data", "export", "nope", "--out", o / "x.jsonl"],
        # train, submitted
        "train wrong columns": lambda f, w, o: ["train", f["wrongcols"], *T],
        "train binary": lambda f, w, o: ["train", f["binary"], *T],
        "train empty": lambda f, w, o: ["train", f["empty"], *T],
        "train truncated json": lambda f, w, o: ["train", f["truncated_json"], *T],
        "train unknown dataset": lambda f, w, o: ["train", "no-such-dataset", *T],
        "train model dir not a model": lambda f, w, o: ["train", f["good"], "--model", f["not_a_model"]],
        "train unknown model": lambda f, w, o: ["train", f["good"], "--model", "nobody/nothing"],
        "train config malformed json": lambda f, w, o: ["train", f["good"], "--config", f["bad_config"]],
        "train config malformed yaml": lambda f, w, o: ["train", f["good"], "--config", f["bad_config_yaml"]],
        "train config not a mapping": lambda f, w, o: ["train", f["good"], "--config", f["config_list"]],
        "train config unknown key": lambda f, w, o: ["train", f["good"], "--config", f["config_unknown"]],
        "train config missing": lambda f, w, o: ["train", f["good"], "--config", f["missing"]],
        "train negative steps": lambda f, w, o: ["train", f["good"], "--model", "tiny-random", "--max-steps", "-3"],
        "train beta 0": lambda f, w, o: ["train", f["good"], *T, "--beta", "0"],
        "train bad scheduler": lambda f, w, o: ["train", f["good"], *T, "--scheduler", "fast"],
        "train steps and epochs": lambda f, w, o: ["train", f["good"], *T, "--epochs", "1"],
        "train run-dir without foreground": lambda f, w, o: ["train", f["good"], *T, "--run-dir", w / "runs" / "x"],
        # train, foreground (the path that used to print tracebacks)
        "train-fg wrong columns": lambda f, w, o: ["train", f["wrongcols"], *T, "--foreground"],
        "train-fg binary": lambda f, w, o: ["train", f["binary"], *T, "--foreground"],
        "train-fg empty": lambda f, w, o: ["train", f["empty"], *T, "--foreground"],
        "train-fg truncated jsonl": lambda f, w, o: ["train", f["truncated_jsonl"], *T, "--foreground"],
        "train-fg unknown dataset": lambda f, w, o: ["train", "no-such-dataset", *T, "--foreground"],
        "train-fg model dir not a model": lambda f, w, o: [
            "train",
            f["good"],
            "--model",
            f["not_a_model"],
            "--foreground",
        ],
        "train-fg config malformed yaml": lambda f, w, o: [
            "train",
            f["good"],
            "--config",
            f["bad_config_yaml"],
            "--foreground",
        ],
        "train-fg run-dir outside workspace": lambda f, w, o: [
            "train",
            f["good"],
            *T,
            "--foreground",
            "--run-dir",
            o / "elsewhere",
        ],
        # diagnose (foreground and submitted)
        "diagnose wrong columns": lambda f, w, o: ["diagnose", f["wrongcols"], "--foreground"],
        "diagnose binary": lambda f, w, o: ["diagnose", f["binary"], "--foreground"],
        "diagnose empty": lambda f, w, o: ["diagnose", f["empty"], "--foreground"],
        "diagnose truncated json": lambda f, w, o: ["diagnose", f["truncated_json"], "--foreground"],
        "diagnose embedder dir not a model": lambda f, w, o: [
            "diagnose",
            f["good"],
            "--embedder",
            f["not_a_model"],
            "--foreground",
        ],
        "diagnose unknown dataset": lambda f, w, o: ["diagnose", "no-such-dataset", "--foreground"],
        "diagnose unknown threshold": lambda f, w, o: ["diagnose", f["good"], "--threshold", "nope=1", "--foreground"],
        "diagnose threshold not a number": lambda f, w, o: ["diagnose", f["good"], "--threshold", "eps1=abc"],
        "diagnose threshold without value": lambda f, w, o: ["diagnose", f["good"], "--threshold", "eps1"],
        "diagnose bad distance": lambda f, w, o: ["diagnose", f["good"], "--distance", "manhattan"],
        "diagnose max-pairs 1": lambda f, w, o: ["diagnose", f["good"], "--max-pairs", "1"],
        # htsr
        "htsr dir not a model": lambda f, w, o: ["htsr", f["not_a_model"]],
        "htsr unknown model": lambda f, w, o: ["htsr", "no-such-model"],
        "htsr-fg run-dir outside workspace": lambda f, w, o: [
            "htsr",
            "tiny-random",
            "--foreground",
            "--run-dir",
            o / "elsewhere",
        ],
        # report
        "report unknown run": lambda f, w, o: ["report", "no-such-run", "--out", o / "r.html"],
        "report unknown job": lambda f, w, o: ["report", "4242", "--out", o / "r.html"],
        "report path outside workspace": lambda f, w, o: ["report", "..", "--out", o / "r.html"],
        "report run id with a path": lambda f, w, o: ["report", "../../etc", "--out", o / "r.html"],
        "report unknown diagnosis": lambda f, w, o: ["report", "run-a", "--diagnosis", "nope", "--out", o / "r.html"],
        # jobs
        "jobs show unknown": lambda f, w, o: ["jobs", "show", "99"],
        "jobs logs unknown": lambda f, w, o: ["jobs", "logs", "99"],
        "jobs cancel unknown": lambda f, w, o: ["jobs", "cancel", "99"],
        "jobs list bad status": lambda f, w, o: ["jobs", "list", "--status", "done"],
        "jobs selftest bad device": lambda f, w, o: ["jobs", "selftest", "--device", "gpu"],
    }
    return list(cases.items())


def _invoke(argv, workspace):
    return CliRunner().invoke(app, [str(a) for a in argv] + ["--workspace", str(workspace.root)])


def _workspace_state(workspace):
    from dpo_engine.jobs import JobStore

    runs = sorted(p.name for p in workspace.runs_dir.iterdir()) if workspace.runs_dir.is_dir() else []
    store = JobStore.for_workspace(workspace)
    try:
        jobs = [j.id for j in store.list()]
    finally:
        store.close()
    datasets = sorted(p.name for p in workspace.datasets_dir.iterdir()) if workspace.datasets_dir.is_dir() else []
    return runs, jobs, datasets


@pytest.mark.parametrize("case, argv", _cases(), ids=[c for c, _ in _cases()])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, argv, files, workspace, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (workspace.runs_dir / "run-a").mkdir()  # one existing run (for --diagnosis and the ".." cases)
    before = _workspace_state(workspace)
    res = _invoke(argv(files, workspace.root, outside), workspace)
    assert res.exception is None or isinstance(res.exception, SystemExit), (
        f"{case}: escaped {type(res.exception).__name__}: {res.exception}"
    )
    assert "Traceback" not in res.output
    assert res.exit_code == 2, f"{case}: exit {res.exit_code}: {res.output}"
    # progress bars (carriage-return lines from tqdm) are not messages
    lines = [line for line in res.output.split("\n") if line.strip() and not line.startswith("\r")]
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{case}: {res.output!r}"
    assert len(lines[0]) > len("error: ") + 10  # says what was wrong
    assert _workspace_state(workspace) == before, f"{case} left something behind"
    assert list(outside.iterdir()) == []


def test_parser_errors_are_one_line_too(workspace):
    """Bad option types and unknown flags through the real entry point (not CliRunner)."""
    for argv in (
        ["train", "d", "--max-steps", "abc"],
        ["train", "d", "--no-such-flag"],
        ["jobs", "show", "x"],
        ["report"],
    ):
        run = subprocess.run(
            [sys.executable, "-m", "dpo_engine.cli", *argv, "--workspace", str(workspace.root)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 2, run.stderr
        assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
        assert run.stderr.startswith("error: ") and "--help" in run.stderr


def test_a_rejected_train_after_a_good_one_leaves_only_the_good_job(files, workspace):
    ok = _invoke(["train", files["good"], "--model", "tiny-random", "--max-steps", "2"], workspace)
    assert ok.exit_code == 0, ok.output
    bad = _invoke(["train", files["wrongcols"], "--model", "tiny-random", "--max-steps", "2"], workspace)
    assert bad.exit_code == 2
    runs, jobs, _ = _workspace_state(workspace)
    assert len(jobs) == 1 and runs == [ok.output.strip().splitlines()[-1]]
