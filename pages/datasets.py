"""Datasets: upload preference data, read its validation report, save it; list, export, delete.

Validating and storing run as "ingest" jobs on a worker; the page writes the upload to the
workspace, follows the jobs and shows what they found."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import streamlit as st

from app.state import dataset_store, job_store, workspace
from app.ui import job_status_panel, page_header
from dpo_engine.data import FLAG_REASONS, IngestOptions, StagedIngest
from dpo_engine.data.job import INGEST_PRIORITY, STAGED_DIR, upload_path

page_header(
    "Datasets",
    "Upload preference pairs; a worker checks every row and lists the flagged ones before anything is stored.",
)

tab_add, tab_list = st.tabs(["Add a dataset", "Your datasets"])


def _issues_frame(report) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "row": i.row,
                "reason": i.reason,
                "column": i.column or "",
                "problem": i.message,
                "action": "dropped (unusable)" if i.unusable else "flagged",
            }
            for i in report.issues
        ]
    )


def _show_report(report) -> None:
    c = st.columns(4)
    c[0].metric("Rows in file", report.n_rows_in)
    c[1].metric("Usable rows", report.n_usable)
    c[2].metric("Flagged (usable)", report.n_flagged)
    c[3].metric("Unusable", report.n_unusable)
    st.caption(
        f"Detected format **{report.detected_format}**, layout **{report.detected_layout}**; "
        f"columns used: {report.mapping}"
    )
    for w in report.warnings:
        st.warning(w)
    counts = {k: v for k, v in report.counts.items() if v}
    if counts:
        st.markdown("**Problems by reason** (a row can have several)")
        st.dataframe(
            pd.DataFrame({"reason": list(counts), "rows": list(counts.values())}), hide_index=True, width="content"
        )
        st.markdown("**Rows with problems** (row = line or row number in your file)")
        st.dataframe(_issues_frame(report), hide_index=True, width="stretch", height=240)
    else:
        st.success("No problems found: every row is usable.")


def _save_upload(uploaded) -> Path:
    """Write the upload to the workspace in chunks (the page never parses it; a job does)."""
    path = upload_path(workspace(), uploaded.file_id, uploaded.name)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".part")
        uploaded.seek(0)
        try:
            with open(partial, "wb") as out:
                shutil.copyfileobj(uploaded, out, length=1 << 20)
            partial.rename(path)
        except OSError:
            partial.unlink(missing_ok=True)
            raise
    return path


def _validate_once(uploaded, params: dict, title: str) -> int:
    """The validate job of this upload with these options, submitted the first time they are seen.

    A newer choice of options supersedes the previous job: it is cancelled if still waiting and
    its staged copy is removed."""
    jobs = st.session_state.setdefault("ingest-jobs", {})
    key = json.dumps(params, sort_keys=True)
    latest = st.session_state.setdefault("ingest-latest", {})
    file_id = uploaded.file_id
    previous = latest.get(file_id)
    if key not in jobs:
        _save_upload(uploaded)  # only now: a job that ran already may have consumed it
        jobs[key] = job_store().submit("ingest", params, title=title, priority=INGEST_PRIORITY).id
    if previous is not None and previous != jobs[key]:
        old = job_store().get(previous)
        if old.status in ("queued", "running"):
            job_store().request_cancel(old.id)
        shutil.rmtree(Path(old.run_dir) / STAGED_DIR, ignore_errors=True)
        jobs.pop(next((k for k, v in jobs.items() if v == previous), None), None)
    latest[file_id] = jobs[key]
    return jobs[key]


@st.fragment(run_every=1)
def _follow(job_id: int) -> None:
    job = job_store().get(job_id)
    job_status_panel(job, key=f"ingest-{job_id}")
    if job.status not in ("queued", "running"):
        st.rerun(scope="app")


def _job_done(job_id: int):
    """The finished job, or None (its live status is shown) while it is queued or running."""
    job = job_store().get(job_id)
    if job.status in ("queued", "running"):
        _follow(job_id)
        return None
    if job.status != "succeeded":
        job_status_panel(job, key=f"ingest-{job_id}", show_cancel=False)
        if st.button("Try again", key=f"retry-{job_id}"):
            jobs = st.session_state.get("ingest-jobs", {})
            jobs.pop(next((k for k, v in jobs.items() if v == job_id), None), None)
            stored = st.session_state.get("ingest-stored", {})
            stored.pop(next((k for k, v in stored.items() if v == job_id), None), None)
            st.rerun()
        return None
    return job


def _mapper(result: dict, mapping_key: str, file_id: str) -> None:
    st.error(result["error"])
    st.markdown(
        "**Map your columns** to prompt / chosen / rejected, and optionally a category or source column "
        "(the diagnosis then breaks its numbers down per group):"
    )
    found = ["(none)"] + list(result["columns_found"])
    mc = st.columns(4)
    chosen_map = {}
    for col, field in zip(mc, ("prompt", "chosen", "rejected", "category")):
        default = result["suggested_mapping"].get(field, "(none)")
        chosen_map[field] = col.selectbox(
            field, found, index=found.index(default) if default in found else 0, key=f"map-{field}-{file_id}"
        )
    if st.button("Apply mapping"):
        st.session_state[mapping_key] = {k: v for k, v in chosen_map.items() if v != "(none)"}
        st.rerun()


def _staged_report(job, uploaded, upload: Path) -> None:
    stored_jobs = st.session_state.setdefault("ingest-stored", {})
    if job.id in stored_jobs and (stored := _job_done(stored_jobs[job.id])) is not None:
        result = stored.result
        st.session_state["ingest-stored-uploads"][uploaded.file_id] = result  # options no longer matter
        st.success(f"Saved dataset **{result['name']}** (`{result['dataset_id']}`) with {result['n_pairs']} pairs.")
        return
    if job.id in stored_jobs and job_store().get(stored_jobs[job.id]).status in ("queued", "running"):
        return
    if not (Path(job.run_dir) / STAGED_DIR / "report.json").is_file():
        st.info("This validation was stored or cleared already; upload the file again to check it anew.")
        return
    staged = StagedIngest.open(Path(job.run_dir) / STAGED_DIR)
    st.subheader("Validation report")
    _show_report(staged.report)
    st.markdown("**Preview of the canonical table**")
    st.dataframe(staged.preview(10), hide_index=True, width="stretch")
    present = [r for r in FLAG_REASONS if staged.report.counts.get(r)]
    drop = st.multiselect(
        "Drop rows flagged as",
        present,
        default=present,
        help="Unusable rows are always dropped; flagged rows are yours to keep or drop.",
    )
    n_kept, dropped = staged.kept_count(drop)
    st.info(f"Saving keeps **{n_kept}** of {staged.report.n_rows_in} rows; dropped by reason: {dropped or 'none'}.")
    name = st.text_input("Dataset name", value=Path(uploaded.name).name.split(".")[0])
    if st.button("Save dataset", type="primary"):
        params = {
            "step": "store",
            "staged": job.run_dir,
            "upload": str(upload),
            "name": name,
            "filename": uploaded.name,
            "drop": drop,
        }
        stored_jobs[job.id] = job_store().submit("ingest", params, title=f"store {name}", priority=INGEST_PRIORITY).id
        st.rerun()


with tab_add:
    uploaded = st.file_uploader(
        "Preference file (JSONL, JSON, CSV or Parquet; .gz accepted)",
        type=["jsonl", "json", "csv", "parquet", "gz"],
        help="Flat prompt/chosen/rejected columns, TRL conversational messages, or raw HH-RLHF dialogues. "
        "The file is checked by a job on a worker, row by row, whatever its size.",
    )
    with st.expander("Format, layout and limits (auto-detected)"):
        oc = st.columns(3)
        fmt = oc[0].selectbox("File format", ["auto", "jsonl", "json", "csv", "parquet"])
        layout = oc[1].selectbox(
            "Layout",
            ["auto", "flat", "conversational", "hh"],
            help="flat: prompt/chosen/rejected strings; conversational: lists of "
            "{role, content}; hh: raw '\\n\\nHuman: … \\n\\nAssistant: …' dialogues.",
        )
        max_chars = oc[2].number_input(
            "Flag texts longer than (characters)", min_value=100, value=IngestOptions().max_chars, step=1000
        )
        category_column = st.text_input(
            "Category or source column (optional)",
            help="A column with a common name (category, source, …) is picked up by itself; name another one "
            "here. The diagnosis then shows its audit and metrics per group.",
        ).strip()
    stored_uploads = st.session_state.setdefault("ingest-stored-uploads", {})
    if uploaded is not None and uploaded.file_id in stored_uploads:
        result = stored_uploads[uploaded.file_id]
        st.success(f"Saved dataset **{result['name']}** (`{result['dataset_id']}`) with {result['n_pairs']} pairs.")
    elif uploaded is not None:
        mapping_key = f"mapping-{uploaded.file_id}"
        mapping = dict(st.session_state.get(mapping_key) or {})
        if category_column:
            mapping["category"] = category_column
        upload = upload_path(workspace(), uploaded.file_id, uploaded.name)
        params = {
            "step": "validate",
            "upload": str(upload),
            "filename": uploaded.name,
            "fmt": fmt,
            "layout": layout,
            "mapping": mapping,
            "max_chars": int(max_chars),
        }
        validate_id = _validate_once(uploaded, params, title=f"validate {uploaded.name}")
        job = _job_done(validate_id)
        if job is not None:
            outcome = job.result.get("outcome")
            if outcome == "needs_mapping":
                _mapper(job.result, mapping_key, uploaded.file_id)
            elif outcome == "no_usable_rows":
                st.error(job.result["error"])
                _show_report(StagedIngest.report_only(Path(job.run_dir) / STAGED_DIR))
            elif outcome == "unusable":
                st.error(f"This file cannot be used: {job.result['error']}")
            else:
                _staged_report(job, uploaded, upload)

with tab_list:
    store = dataset_store()
    infos = store.list()
    if not infos:
        st.info("No datasets yet: add one in the first tab.")
    else:
        table = pd.DataFrame(
            [
                {
                    "name": i.name,
                    "id": i.id,
                    "pairs": i.n_pairs,
                    "source": i.source,
                    "created": i.created_at.strftime("%Y-%m-%d %H:%M"),
                    "added by": i.submitted_by or "",
                    "dropped": sum(i.dropped.values()),
                }
                for i in infos
            ]
        )
        st.dataframe(table, hide_index=True, width="stretch")
        ids = [i.id for i in infos]
        chosen_id = st.selectbox("Dataset", ids, format_func=lambda d: f"{store.get(d).name} ({d})")
        info = store.get(chosen_id)
        st.caption(
            f"{info.n_pairs} pairs from {info.source}; format {info.detected_format}, "
            f"layout {info.detected_layout}; dropped {info.dropped or 'none'}"
        )
        dc = st.columns(4)
        for col, fmt_name, mime in (
            (dc[0], "jsonl", "application/jsonl"),
            (dc[1], "csv", "text/csv"),
            (dc[2], "parquet", "application/octet-stream"),
        ):
            col.download_button(
                f"Download {fmt_name}",
                lambda fmt_name=fmt_name: store.export(chosen_id, fmt_name),  # built when clicked
                file_name=f"{chosen_id}.{fmt_name}",
                mime=mime,
                key=f"dl-{fmt_name}",
            )
        if dc[3].button("Compute embeddings"):
            job = job_store().submit("embed", {"dataset_id": chosen_id}, title=f"embed {info.name}")
            st.success(f"Embedding job #{job.id} queued; follow it on the Jobs page.")
        with st.expander("Delete this dataset"):
            confirm = st.checkbox(f"Yes, delete {info.name}", key=f"confirm-del-{chosen_id}")
            if st.button("Delete", disabled=not confirm):
                store.delete(chosen_id)
                st.success(f"Deleted {info.name}.")
                st.rerun()
