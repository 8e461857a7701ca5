"""`dpo-kernels data ...`: add, list, show, delete and export datasets of a workspace."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from tqdm import tqdm

from dpo_engine.cli.common import WorkspaceOption, fail, print_json, workspace
from dpo_engine.data import DatasetStore, IngestOptions, stage_preferences

data_app = typer.Typer(help="Add, inspect and export preference datasets.", no_args_is_help=True)


def _parse_mapping(items: list[str]) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for item in items:
        field, sep, column = item.partition("=")
        if not sep or not field.strip() or not column.strip():
            fail(f"--map expects FIELD=COLUMN (e.g. prompt=question), got {item!r}")
        mapping[field.strip()] = column.strip()
    return mapping


@data_app.command("add")
def add(
    file: Path = typer.Argument(..., help="JSONL / JSON / CSV / Parquet file, optionally .gz."),
    name: Optional[str] = typer.Option(None, "--name", help="Dataset name (default: file name without extensions)."),
    fmt: str = typer.Option("auto", "--format", help="File format. Allowed: auto, jsonl, json, csv, parquet."),
    layout: str = typer.Option("auto", "--layout", help="Column layout. Allowed: auto, flat, conversational, hh."),
    map_: list[str] = typer.Option(
        [], "--map", help="FIELD=COLUMN, repeatable (fields: prompt, chosen, rejected, category)."
    ),
    keep_flagged: bool = typer.Option(
        False, "--keep-flagged", help="Keep flagged rows (duplicates, empty, too long...)."
    ),
    max_chars: int = typer.Option(20_000, "--max-chars", help="Texts longer than this are flagged too_long."),
    ws: Optional[str] = WorkspaceOption,
) -> None:
    """Validate FILE and store it as a dataset; prints the outcome as JSON."""
    if max_chars <= 0:
        fail("--max-chars must be positive")
    mapping = _parse_mapping(map_)
    dataset_name = name or file.name.split(".")[0] or "dataset"
    store = DatasetStore(workspace(ws))
    # unusable files, existing names, bad options -> one line, exit 2 (dpo_engine.cli.common)
    with tqdm(total=100, desc="validating", unit="%", disable=None, leave=False) as bar:

        def progress(fraction: float, message: str) -> None:
            bar.n = round(100 * fraction)
            bar.set_postfix_str(message, refresh=True)

        with store.staging() as folder:
            staged = stage_preferences(
                file,
                folder,
                fmt=fmt,
                layout=layout,
                mapping=mapping or None,
                options=IngestOptions(max_chars=max_chars),
                progress=progress,
            )
            bar.set_description("storing")
            info = store.add(staged, dataset_name, source=str(file), drop_flagged=not keep_flagged)
    print_json(
        {
            "dataset_id": info.id,
            "name": info.name,
            "n_pairs": info.n_pairs,
            "n_rows_in": info.n_rows_in,
            "dropped": info.dropped,
            "n_flagged_kept": info.n_flagged_kept,
            "warnings": info.warnings,
            "detected_format": info.detected_format,
            "detected_layout": info.detected_layout,
            "mapping": info.mapping,
            "content_hash": info.content_hash,
        }
    )


@data_app.command("list")
def list_(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    ws: Optional[str] = WorkspaceOption,
) -> None:
    """List stored datasets."""
    infos = DatasetStore(workspace(ws)).list()
    if as_json:
        print_json([i.model_dump(mode="json") for i in infos])
        return
    if not infos:
        typer.echo("no datasets")
        return
    rows = [("ID", "NAME", "PAIRS", "LAYOUT", "CREATED")] + [
        (i.id, i.name, str(i.n_pairs), i.detected_layout, i.created_at.strftime("%Y-%m-%d %H:%M")) for i in infos
    ]
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())


@data_app.command("show")
def show(
    dataset: str = typer.Argument(..., help="Dataset id or name."),
    ws: Optional[str] = WorkspaceOption,
) -> None:
    """Print a dataset's metadata as JSON."""
    info = DatasetStore(workspace(ws)).get(dataset)
    print_json(info.model_dump(mode="json"))


@data_app.command("delete")
def delete(
    dataset: str = typer.Argument(..., help="Dataset id or name."),
    ws: Optional[str] = WorkspaceOption,
) -> None:
    """Delete a stored dataset."""
    info = DatasetStore(workspace(ws)).delete(dataset)
    typer.echo(f"deleted {info.id}")


@data_app.command("export")
def export(
    dataset: str = typer.Argument(..., help="Dataset id or name."),
    out: Path = typer.Option(..., "--out", help="File to write."),
    fmt: Optional[str] = typer.Option(
        None, "--format", help="Allowed: jsonl, csv, parquet. Default: from --out's extension, else jsonl."
    ),
    ws: Optional[str] = WorkspaceOption,
) -> None:
    """Write a dataset's canonical table to a file."""
    chosen = fmt or {".csv": "csv", ".parquet": "parquet"}.get(out.suffix.lower(), "jsonl")
    if chosen not in ("jsonl", "csv", "parquet"):
        fail(f"unknown export format {chosen!r}; use jsonl, csv or parquet")
    payload = DatasetStore(workspace(ws)).export(dataset, chosen)  # type: ignore[arg-type]
    out.write_bytes(payload)  # an unwritable --out -> "cannot use PATH: reason", exit 2
    typer.echo(f"wrote {out} ({chosen}, {len(payload)} bytes)")


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
