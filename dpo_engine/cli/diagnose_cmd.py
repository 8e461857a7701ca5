"""`dpo-kernels diagnose`: the eight selection metrics and the recommended kernel-divergence pair.

By default the work is a "diagnose" job run by a worker (the command waits and shows progress);
``--foreground`` runs it in this process instead.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import typer

from dpo_engine.analysis.audit.thresholds import LABEL_NOISE_MAX_PAIRS
from dpo_engine.cli.common import WorkspaceOption, fail
from dpo_engine.cli.common import workspace as resolve_workspace
from dpo_engine.schema import validation_errors

WORKER_AGE_S = 15.0
# DiagnoseParams field -> the flag that sets it (for one-line validation errors)
PARAM_FLAGS = {
    "distance": "--distance",
    "max_pairs": "--max-pairs",
    "n_bootstrap": "--bootstrap",
    "seed": "--seed",
    "precision": "--precision",
    "backend": "--backend",
    "preflight_model": "--model",
    "max_length": "--max-length",
    "max_prompt_length": "--max-prompt-length",
    "embedder": "--embedder",
    "thresholds": "--threshold",
    "split_by": "--split-by",
    "split_seed": "--split-seed",
}
DEFAULT_BACKEND_NAME = "onnx-int8"  # keep in step with dpo_engine.embed.encoder.DEFAULT_BACKEND (no heavy import here)


def parse_threshold_options(options: list[str]) -> dict[str, float]:
    """NAME=VALUE strings -> validated overrides (ValueError with a one-line message otherwise)."""
    from dpo_engine.selection.rules import Thresholds

    values: dict[str, str] = {}
    for option in options:
        name, sep, value = option.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"--threshold expects NAME=VALUE, got {option!r}")
        values[name.strip()] = value.strip()
    thresholds = Thresholds.from_assignments(values)
    return {name: getattr(thresholds, name) for name in values}


def _summary_lines(data: dict[str, Any]) -> list[str]:
    rec = data["recommendation"]
    conf = rec["confidence"]
    dataset = data.get("dataset", {})
    lines = [
        f"diagnosed {data['n_pairs']} pairs of {dataset.get('label', '?')} "
        f"(embedder {data['embedder']}, {data['distance']} distance)"
    ]
    dropped = dataset.get("dropped_at_ingest") or {}
    if dropped:
        detail = ", ".join(f"{k}: {v}" for k, v in dropped.items())
        lines.append(f"dropped {sum(dropped.values())} flagged rows at ingest ({detail})")
    for kind in ("kernel", "divergence"):
        name = rec[kind]
        label = "UNCERTAIN" if rec.get(f"{kind}_uncertain") else "confidence"
        lines.append(
            f"{kind:<10} {name:<14} {label} {conf[kind].get(name, 0.0):.0%}   runner-up "
            f"{rec.get(f'{kind}_runner_up') or '-'}"
        )
        if rec.get(f"{kind}_uncertain"):
            lines.append(f"           {rec[f'{kind}_verdict']}")
        lines.append(f"           because {rec[f'{kind}_rule']}")
    preflight = data.get("token_preflight")
    if preflight:
        from dpo_engine.data.preflight import TokenPreflight

        lines.extend(TokenPreflight(**preflight).summary_lines())
    if audit := data.get("audit"):
        from dpo_engine.analysis.audit import summary_lines

        lines.extend(summary_lines(audit))
        if by_group := audit.get("by_group"):
            from dpo_engine.selection.groups import summary_lines as group_lines

            lines.extend(group_lines(by_group))
    km, dm = data["kernel_metrics"], data["divergence_metrics"]
    lines.append("metrics    " + "  ".join(f"{k}={v:.4g}" for k, v in km.items()))
    lines.append("           " + "  ".join(f"{k}={'n/a' if v is None else format(v, '.4g')}" for k, v in dm.items()))
    return lines


def write_flagged(frame, out: Path) -> None:
    """The audit's flagged pairs as CSV, or JSON Lines when the name ends in .jsonl."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".jsonl":
        frame.to_json(out, orient="records", lines=True, force_ascii=False)
    else:
        frame.to_csv(out, index=False)


def _run_foreground(params, ws) -> tuple[dict[str, Any], Any, Any]:
    from tqdm import tqdm

    from dpo_engine.selection.job import run_diagnosis

    bar = tqdm(total=100, unit="%", desc="diagnose", bar_format="{l_bar}{bar}| {n:.0f}% {postfix}")
    try:

        def progress(fraction: float, message: str) -> None:
            bar.n = round(100 * fraction, 1)
            bar.set_postfix_str(message, refresh=False)
            bar.refresh()

        flagged = []
        diagnosis, embeddings, _, summary = run_diagnosis(
            params, ws, run_dir=None, progress=progress, flagged=flagged.append
        )
    finally:
        bar.close()
    data = diagnosis.to_json_dict()
    data["dataset"] = summary["dataset"]
    data["token_preflight"] = summary["token_preflight"]
    data["audit"] = summary["audit"]
    return data, embeddings, (flagged[0] if flagged else None)


def _run_as_job(params, ws, timeout: float | None) -> tuple[dict[str, Any], Path]:
    from tqdm import tqdm

    from dpo_engine.jobs import SUCCEEDED, JobStore, wait_for_job
    from dpo_engine.selection.diagnosis import DIAGNOSIS_JSON

    store = JobStore.for_workspace(ws)
    job = store.submit("diagnose", params.model_dump(), title=f"diagnose {Path(params.dataset).name}")
    typer.echo(f"submitted job {job.id} (run {job.run_id})", err=True)
    if not store.alive_workers(max_age_s=WORKER_AGE_S):
        typer.echo(
            "no worker is running in this workspace: start one with `dpo-kernels worker` "
            "(or rerun with --foreground); waiting for the job...",
            err=True,
        )
    bar = tqdm(total=100, unit="%", desc=f"job {job.id}", bar_format="{l_bar}{bar}| {n:.0f}% {postfix}")
    try:

        def on_change(snapshot) -> None:
            bar.n = round(100 * snapshot.progress, 1)
            bar.set_postfix_str(f"{snapshot.status} {snapshot.message}", refresh=False)
            bar.refresh()

        try:
            final = wait_for_job(store, job.id, timeout=timeout, progress_callback=on_change)
        except TimeoutError as exc:
            fail(f"{exc}; the job stays queued/running (see `dpo-kernels jobs show {job.id}`)", code=1)
    finally:
        bar.close()
    if final.status != SUCCEEDED:
        fail(f"job {job.id} {final.status}: {final.error or final.message}", code=1)
    run_dir = Path(final.run_dir)
    return json.loads((run_dir / DIAGNOSIS_JSON).read_text()), run_dir


def register(app: typer.Typer) -> None:
    @app.command("diagnose")
    def diagnose_command(
        source: str = typer.Argument(
            ..., metavar="FILE_OR_DATASET_ID", help="A preference file or a stored dataset id/name."
        ),
        embedder: str = typer.Option(
            "all-MiniLM-L6-v2", "--embedder", help="sentence-transformers name or local path."
        ),
        distance: str = typer.Option("cosine", "--distance", help="cosine or euclidean."),
        max_pairs: int | None = typer.Option(None, "--max-pairs", help="Use only the first N pairs."),
        threshold: list[str] = typer.Option(
            [], "--threshold", help="Override a rule threshold: NAME=VALUE (repeatable)."
        ),
        json_out: Path | None = typer.Option(None, "--json", help="Write the diagnosis JSON here."),
        save_embeddings: Path | None = typer.Option(
            None, "--save-embeddings", help="Write prompt/chosen/rejected embeddings (.npz)."
        ),
        precision: str = typer.Option(
            "auto",
            "--precision",
            help="Encoder precision: auto (bfloat16 on CPUs with native bf16), float32 or bfloat16.",
        ),
        backend: str = typer.Option(
            DEFAULT_BACKEND_NAME, "--backend", help="Encoder runtime: torch, onnx or onnx-int8 (exported locally, CPU)."
        ),
        foreground: bool = typer.Option(False, "--foreground", help="Run in this process instead of as a job."),
        n_bootstrap: int = typer.Option(200, "--bootstrap", help="Bootstrap resamples for the confidence."),
        seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
        timeout: float | None = typer.Option(None, "--timeout", help="Give up waiting for the job after S seconds."),
        model: str = typer.Option(
            "smollm2-135m-instruct", "--model", help="Model whose tokenizer the token pre-flight uses."
        ),
        max_length: int = typer.Option(256, "--max-length", help="Training max_length the pre-flight checks."),
        max_prompt_length: int | None = typer.Option(
            None, "--max-prompt-length", help="Training max_prompt_length (default half of max_length)."
        ),
        preflight: bool = typer.Option(
            True, "--preflight/--no-preflight", help="Token pre-flight: lengths and truncation."
        ),
        audit: bool = typer.Option(
            True, "--audit/--no-audit", help="Data audit: length bias, duplicates and conflicts, split leakage."
        ),
        label_noise: bool = typer.Option(
            True,
            "--label-noise/--no-label-noise",
            help="Label-noise candidates in the audit (the embedding margin).",
        ),
        label_noise_logprob: bool = typer.Option(
            False,
            "--label-noise-logprob",
            help="Also --model's log-prob gap (with the pre-flight; a forward pass over up to "
            f"{LABEL_NOISE_MAX_PAIRS:,} pairs).",
        ),
        split_by: str = typer.Option(
            "prompt", "--split-by", help="The training split the leakage check uses: prompt or pair (data.split_by)."
        ),
        split_seed: int = typer.Option(0, "--split-seed", help="Seed of that split (the training seed)."),
        audit_out: Path | None = typer.Option(
            None, "--audit-out", help="Write the audit's flagged pairs here (.csv, or .jsonl for JSON Lines)."
        ),
        workspace: str | None = WorkspaceOption,
    ) -> None:
        """Diagnose preference data: eight metrics, recommended kernel and divergence, confidence, data audit."""
        from pydantic import ValidationError

        from dpo_engine.selection.job import DiagnoseParams

        try:
            overrides = parse_threshold_options(threshold)
        except ValueError as exc:
            fail(str(exc))
        ws = resolve_workspace(workspace)
        path = Path(source).expanduser()
        if path.is_file():
            dataset = str(path.resolve())
        else:
            from dpo_engine.data import DatasetNotFound, DatasetStore

            try:
                dataset = DatasetStore(ws).get(source).id
            except DatasetNotFound as exc:
                fail(f"{source!r} is neither a file nor a stored dataset ({exc})")
        try:
            params = DiagnoseParams(
                dataset=dataset,
                embedder=embedder,
                distance=distance,
                max_pairs=max_pairs,
                thresholds=overrides,
                n_bootstrap=n_bootstrap,
                seed=seed,
                precision=precision,
                backend=backend,
                preflight_model=model if preflight else None,
                max_length=max_length,
                max_prompt_length=max_prompt_length,
                audit=audit,
                label_noise=label_noise,
                label_noise_logprob=label_noise_logprob,
                split_by=split_by,
                split_seed=split_seed,
            )
        except ValidationError as exc:  # DiagnoseParams declares every constraint; name the flag that broke one
            path, message = next(iter(validation_errors(exc).items()))
            fail(f"{PARAM_FLAGS.get(path, 'invalid option')}: {message}")

        if foreground:
            from dpo_engine.data import DataFormatError
            from dpo_engine.embed import EmbedderNotAvailable

            try:
                data, embeddings, flagged = _run_foreground(params, ws)
            except (DataFormatError, EmbedderNotAvailable, ValueError) as exc:
                fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            if save_embeddings is not None:
                embeddings.save_npz(save_embeddings)
        else:
            data, run_dir = _run_as_job(params, ws, timeout)
            flagged = None
            if audit_out is not None:
                import pandas as pd

                from dpo_engine.analysis.audit import AUDIT_FLAGGED

                if (run_dir / AUDIT_FLAGGED).is_file():
                    flagged = pd.read_parquet(run_dir / AUDIT_FLAGGED)
            if save_embeddings is not None:
                from dpo_engine.selection.job import EMBEDDINGS_NPZ

                save_embeddings.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(run_dir / EMBEDDINGS_NPZ, save_embeddings)
            typer.echo(f"run directory: {run_dir}")
        if json_out is not None:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(data, indent=2))
        for line in _summary_lines(data):
            typer.echo(line)
        if audit_out is not None:
            if flagged is None:
                fail("--audit-out: this diagnosis has no data audit (--no-audit)", code=1)
            write_flagged(flagged, audit_out)
            typer.echo(f"wrote {len(flagged)} flagged rows to {audit_out}")
        if json_out is not None:
            typer.echo(f"wrote {json_out}")
        if save_embeddings is not None:
            typer.echo(f"wrote {save_embeddings}")
