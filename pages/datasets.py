"""Datasets: upload preference data, read its validation report, save it; list, export, delete."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from app.state import dataset_store, job_store
from app.ui import page_header
from dpo_engine.data import (
    FLAG_REASONS,
    DataFormatError,
    DatasetExists,
    IngestOptions,
    MissingColumnsError,
    NoUsableRowsError,
    load_preferences,
)

page_header("Datasets", "Upload preference pairs; every flagged row is listed before anything is stored.")

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


with tab_add:
    uploaded = st.file_uploader(
        "Preference file (JSONL, JSON, CSV or Parquet; .gz accepted)",
        type=["jsonl", "json", "csv", "parquet", "gz"],
        help="Flat prompt/chosen/rejected columns, TRL conversational messages, or raw HH-RLHF dialogues.",
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
    if uploaded is not None:
        mapping_key = f"mapping-{uploaded.file_id}"
        mapping = st.session_state.get(mapping_key)
        try:
            result = load_preferences(
                uploaded.getvalue(),
                filename=uploaded.name,
                fmt=fmt,
                layout=layout,
                mapping=mapping,
                options=IngestOptions(max_chars=int(max_chars)),
            )
        except MissingColumnsError as exc:
            st.error(str(exc))
            st.markdown("**Map your columns** to prompt / chosen / rejected:")
            found = ["(none)"] + list(exc.columns_found)
            mc = st.columns(3)
            chosen_map = {}
            for col, field in zip(mc, ("prompt", "chosen", "rejected")):
                default = exc.suggested_mapping.get(field, "(none)")
                chosen_map[field] = col.selectbox(
                    field,
                    found,
                    index=found.index(default) if default in found else 0,
                    key=f"map-{field}-{uploaded.file_id}",
                )
            if st.button("Apply mapping"):
                st.session_state[mapping_key] = {k: v for k, v in chosen_map.items() if v != "(none)"}
                st.rerun()
            result = None
        except NoUsableRowsError as exc:
            st.error(str(exc))
            _show_report(exc.report)
            result = None
        except DataFormatError as exc:
            st.error(f"This file cannot be used: {exc}")
            result = None

        if result is not None:
            st.subheader("Validation report")
            _show_report(result.report)
            st.markdown("**Preview of the canonical table**")
            st.dataframe(result.preview(10), hide_index=True, width="stretch")
            present = [r for r in FLAG_REASONS if result.report.counts.get(r)]
            drop = st.multiselect(
                "Drop rows flagged as",
                present,
                default=present,
                help="Unusable rows are always dropped; flagged rows are yours to keep or drop.",
            )
            kept, dropped = result.finalize(drop)
            st.info(
                f"Saving keeps **{len(kept)}** of {result.report.n_rows_in} rows; dropped by reason: "
                f"{dropped or 'none'}."
            )
            name = st.text_input("Dataset name", value=Path(uploaded.name).name.split(".")[0])
            if st.button("Save dataset", type="primary"):
                try:
                    info = dataset_store().add(result, name=name, source=uploaded.name, drop_flagged=drop)
                except (DatasetExists, DataFormatError, ValueError) as exc:
                    st.error(str(exc))
                else:
                    st.session_state.pop(mapping_key, None)
                    st.success(f"Saved dataset **{info.name}** (`{info.id}`) with {info.n_pairs} pairs.")

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
                store.export(chosen_id, fmt_name),
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
