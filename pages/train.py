"""Train: a form generated from TrainConfig, prefilled from the diagnosis, submitted as a queued job."""

from __future__ import annotations

import streamlit as st
from pydantic import ValidationError

from app.config_form import FormOptions, attach_errors, render_model_form
from app.state import dataset_store, job_store, workspace
from app.ui import page_header, switch_page
from dpo_engine.schema import validation_errors
from dpo_engine.train.config import TrainConfig
from dpo_engine.train.inputs import check_inputs, check_memory
from dpo_engine.train.presets import PRESET_LABELS, preset_overrides

ERRORS_KEY = "train-form-errors"
WORKER_MAX_AGE_S = 30.0

page_header(
    "Train", "Launch DPO-Kernels training on a worker. Every setting has its default filled in; hover ⓘ for help."
)

datasets = dataset_store().list()
if not datasets:
    st.info("No datasets yet. Add one on the **Datasets** page (the bundled HH-RLHF sample is one click away).")
    st.stop()
by_id = {d.id: d for d in datasets}

START_CHOICES = {None: "Defaults (every setting as TrainConfig writes it)"} | PRESET_LABELS
preset = st.radio(
    "Start from",
    list(START_CHOICES),
    index=0,
    key="train-preset",
    horizontal=True,
    format_func=START_CHOICES.get,
    help="A preset fills the form with named settings of the same config (you can still edit "
    "every field); Quick run = the bundled SmolLM2-135M-Instruct, HMK, short sequences and "
    "48 steps of 4 pairs on CPU (4 min 12 s on 2 idle cores, model load included).",
)
values: dict = preset_overrides(preset) if preset else {}
notes: dict = {}
if preset:
    st.caption(
        f"**{PRESET_LABELS[preset]}**: {len(values)} settings filled in from preset `{preset}`; "
        "they are written to the run's config.json like any other."
    )

recommendation = st.session_state.get("recommendation") or {}
if recommendation:
    source = recommendation.get("source", "the diagnosis")
    for path, key in (("method.kernel.name", "kernel"), ("method.divergence.name", "divergence")):
        if recommendation.get(key):
            values[path] = recommendation[key]
            notes[path] = f"recommended by diagnosis {source} (you may change it)"
    if recommendation.get("dataset_id") in by_id:
        values["data.dataset"] = recommendation["dataset_id"]
    st.success(
        f"Prefilled from diagnosis **{source}**: kernel **{recommendation.get('kernel')}**, "
        f"divergence **{recommendation.get('divergence')}** (marked {chr(0x2B50)})."
    )
else:
    st.caption("Tip: run a diagnosis first (Diagnose page) to get a recommended kernel and divergence.")


def _dataset_widget(spec, value, key):
    ids = list(by_id)
    return st.selectbox(
        "dataset",
        ids,
        index=ids.index(value) if value in by_id else 0,
        key=key,
        format_func=lambda i: f"{by_id[i].name} ({by_id[i].n_pairs} pairs)",
        help=spec.description + " Default: (required).",
    )


store = job_store()
workers = store.alive_workers(max_age_s=WORKER_MAX_AGE_S)
worker_options = [None] + [w.id for w in workers]
worker_by_id = {w.id: w for w in workers}
if not workers:
    st.warning(
        "No worker is alive right now. The job will wait in the queue until one starts "
        "(`dpo-kernels worker`, or `dpo-kernels app` starts one)."
    )

options = FormOptions(
    values=values,
    notes=notes,
    widgets={"data.dataset": _dataset_widget},
    errors=st.session_state.get(ERRORS_KEY, {}),
    group_titles={
        "data": "Data",
        "model": "Model",
        "method": "Method",
        "optimisation": "Optimisation",
        "monitoring": "Monitoring",
        "method.kernel": "Kernel",
        "method.divergence": "Divergence regulariser",
        "method.loss": "Loss (β, γ, label smoothing, ε-DPO)",
    },
)

with st.form("train-form"):
    # one widget key set per starting point, so choosing a preset refills the widgets
    raw = render_model_form(TrainConfig, options, key=f"train-{preset}" if preset else "train")
    st.subheader("Where it runs")
    c1, c2 = st.columns([2, 3])
    worker = c1.selectbox(
        "Worker",
        worker_options,
        key="train-worker",
        format_func=lambda w: (
            "any worker (first free)"
            if w is None
            else f"{worker_by_id[w].hostname} · {worker_by_id[w].device}"
            + (" · busy" if worker_by_id[w].current_job_id else "")
        ),
        help="Alive workers and their devices; the job is pinned to the chosen worker's device.",
    )
    title = c2.text_input("Run title", value="", key="train-title", help="Optional label shown in the run list.")
    if options.errors:
        st.error(
            "Please fix the settings marked above:\n\n"
            + "\n".join(f"- **{path or 'form'}**: {message}" for path, message in options.errors.items())
        )
    submitted = st.form_submit_button("Start training", type="primary")

if submitted:
    try:
        config = TrainConfig.model_validate(raw)
    except ValidationError as exc:
        st.session_state[ERRORS_KEY] = attach_errors(validation_errors(exc), TrainConfig)
        st.rerun()
    st.session_state.pop(ERRORS_KEY, None)
    try:
        check_inputs(config, workspace())
    except Exception as exc:  # the data and model layers' errors carry a one-line message
        st.error(f"Not queued: {exc}")
        st.stop()
    method = config.method
    default_title = f"{config.model.name} · {method.kernel.name}/{method.divergence.name} · {config.data.dataset}"
    device = worker_by_id[worker].device if worker else None
    # any worker: this machine's memory says nothing when a GPU worker may take the job
    gpu_worker_alive = any(w.device.startswith("cuda") for w in workers)
    try:  # against the chosen worker's device where this machine can see it; the job checks again
        if device or not (config.model.needs_nvidia_gpu or gpu_worker_alive):  # else left to the worker that takes it
            check_memory(config, workspace(), device or "cpu")
    except ValueError as exc:  # WillNotFit, or options the device cannot run
        st.error(f"Not queued: {exc}")
        st.stop()
    try:
        job = store.submit(
            "train", config.model_dump(mode="json"), title=title or default_title, requested_device=device
        )
    except ValueError as exc:
        st.error(f"The job could not be queued: {exc}")
        st.stop()
    st.session_state["run_id"] = job.run_id
    st.query_params["run_id"] = job.run_id
    st.success(f"Queued job #{job.id} · run `{job.run_id}`. Opening the run…")
    st.info(f"Open the **Runs** page to follow run `{job.run_id}`.")
    switch_page("runs.py")
