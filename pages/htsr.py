"""HT-SR: WeightWatcher layer analysis of any model on this machine, without training (runs as a job)."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from app.state import job_store, workspace
from app.ui import figure_with_export, job_status_panel, page_header
from dpo_engine.report.rundata import load_run, workspace_runs
from dpo_engine.viz import runs as viz

BUILTIN_MODELS = ("smollm2-135m-instruct", "tiny-random")
LOCAL_PATH = "a local model directory…"
LIVE_STATUSES = ("queued", "running")

page_header(
    "HT-SR analysis",
    "Heavy-tailed self-regularisation: how well-trained each layer of a model looks, from its weights alone.",
)
st.markdown(viz.ALPHA_EXPLANATION)

ws = workspace()
store = job_store()

trained = [e for e in workspace_runs(ws, store) if (e.run_dir / "model").is_dir()]
choices = list(BUILTIN_MODELS) + [f"run:{e.run_id}" for e in trained] + [LOCAL_PATH]
with st.form("htsr-form"):
    choice = st.selectbox(
        "Model",
        choices,
        key="htsr-model",
        format_func=lambda c: f"trained model of {c.removeprefix('run:')}" if c.startswith("run:") else c,
        help="A built-in model, the trained model (LoRA merged) of a finished run, or a Hugging Face directory on "
        "this machine.",
    )
    local = st.text_input("Local directory (when 'a local model directory…' is chosen)", key="htsr-path")
    submitted = st.form_submit_button("Analyse", type="primary")

if submitted:
    if choice == LOCAL_PATH:
        model = local.strip()
        folder = Path(model).expanduser()
        if not model or not folder.is_dir():
            st.error(f"'{model}' is not a directory on this machine. Enter the path of a saved Hugging Face model.")
            st.stop()
        if not ((folder / "config.json").is_file() or (folder / "adapter_config.json").is_file()):
            st.error(
                f"'{model}' holds no Hugging Face model (no config.json) and no LoRA adapter "
                "(no adapter_config.json). Enter the directory a model was saved to."
            )
            st.stop()
    elif choice.startswith("run:"):
        model = str(next(e for e in trained if e.run_id == choice.removeprefix("run:")).run_dir / "model")
    else:
        model = choice
    job = store.submit("htsr", {"model": model}, title=f"HT-SR {Path(model).name if '/' in model else model}")
    st.session_state["htsr_run_id"] = job.run_id
    st.success(f"Queued HT-SR job #{job.id}.")

entries = workspace_runs(ws, store, kind="htsr")
if not entries:
    st.info("No HT-SR analyses yet: pick a model above and press **Analyse**.")
    st.stop()
by_id = {e.run_id: e for e in entries}
ids = list(by_id)
wanted = st.session_state.get("htsr_run_id")
run_id = st.selectbox(
    "Analysis",
    ids,
    index=ids.index(wanted) if wanted in by_id else 0,
    format_func=lambda r: by_id[r].label,
    key="htsr-select",
)


def _view(run_id: str) -> None:
    entry = by_id[run_id]
    job = store.get(entry.job.id)
    job_status_panel(job, key="htsr")
    run = load_run(entry.run_dir, run_id)
    if job.status == "failed":
        st.code(run.log_tail(40) or "(log.txt is empty)", language=None)
        return
    if run.htsr is None:
        st.info("The analysis has not finished yet.")
        return
    summary = run.summary or {}
    weighted = summary.get("weighted_alpha")
    cols = st.columns(3)
    cols[0].metric("Model", str(summary.get("model", job.params.get("model"))))
    cols[1].metric("Weighted alpha", f"{weighted:.3f}" if weighted is not None else "–")
    flagged = viz.htsr_flag_table(run.htsr)
    cols[2].metric("Layers outside [2, 6]", f"{len(flagged)} / {len(run.htsr)}")
    figure_with_export(
        viz.htsr_alpha_figure(run.htsr, title=f"WeightWatcher alpha per layer · {summary.get('model', '')}"),
        key="htsr-alpha",
    )
    if not flagged.empty:
        st.dataframe(flagged, hide_index=True)
    with st.expander("Full per-layer table"):
        st.dataframe(run.htsr, hide_index=True)


live = by_id[run_id].job.status in LIVE_STATUSES
st.fragment(_view, run_every=2 if live else None)(run_id)
