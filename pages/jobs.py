"""Jobs: every queued, running and finished job, live, with its log and a cancel button."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app.state import job_store, workspace
from app.ui import STATUS_ICONS, format_seconds, job_status_panel, page_header
from dpo_engine.jobs import STATUSES
from dpo_engine.report.rundata import workspace_runs
from dpo_engine.rundir import read_log_tail

page_header("Jobs", "Embedding, diagnosis, training and HT-SR jobs run on workers; this page follows them live.")

store = job_store()
status_filter = st.multiselect("Status", list(STATUSES), default=[])
kind_filter = st.selectbox("Kind", ["all", "embed", "diagnose", "train", "htsr", "selftest"])


@st.fragment(run_every=2)
def live_jobs() -> None:
    workers = store.alive_workers(max_age_s=30)
    st.caption(
        "Workers alive: "
        + (
            ", ".join(
                f"{w.id} on {w.device}" + (f" (job #{w.current_job_id})" if w.current_job_id else "") for w in workers
            )
            or "none — start one with `dpo-kernels worker`"
        )
    )
    jobs = store.list(status=status_filter or None, kind=None if kind_filter == "all" else kind_filter, limit=300)
    if not jobs:
        st.info("No jobs yet.")
        return
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "id": j.id,
                    "": STATUS_ICONS.get(j.status, ""),
                    "kind": j.kind,
                    "title": j.title,
                    "status": j.status,
                    "progress": round(100 * (j.progress or 0)),
                    "elapsed": format_seconds(j.elapsed_s),
                    "device": j.device or j.requested_device or "",
                    "by": j.submitted_by or "",
                    "run": j.run_id,
                }
                for j in jobs
            ]
        ),
        hide_index=True,
        width="stretch",
        column_config={
            "progress": st.column_config.ProgressColumn("progress", min_value=0, max_value=100, format="%d%%")
        },
    )
    selected = st.session_state.get("jobs_selected")
    ids = [j.id for j in jobs]
    job_id = selected if selected in ids else ids[0]
    job = store.get(job_id)
    job_status_panel(job, key="jobs-page")
    st.markdown("**Log (last lines)**")
    st.code(read_log_tail(job.log_path) or "(no output yet)", language="text")


st.selectbox(
    "Job",
    [j.id for j in store.list(limit=300)] or [None],
    key="jobs_selected",
    format_func=lambda i: "—" if i is None else f"#{i}",
)
live_jobs()


@st.fragment(run_every=5)
def runs_outside_queue() -> None:
    """Runs started with `dpo-kernels train --foreground` have no job row; list them so this page and
    the Runs page agree on what exists."""
    loose = [e for e in workspace_runs(workspace(), store, examples=False) if e.job is None]
    if loose:
        st.markdown("**Runs started outside the queue** (`train --foreground`; open them on the Runs page)")
        st.dataframe(
            pd.DataFrame([{"run": e.run_id, "status": e.status} for e in loose]), hide_index=True, width="stretch"
        )


runs_outside_queue()
