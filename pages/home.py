"""Overview: what is in the workspace and the three steps from data to a trained, explained model."""

from __future__ import annotations

import streamlit as st

from app.state import dataset_store, job_store, workspace
from app.ui import page_header, page_link
from dpo_engine.report.rundata import workspace_runs

page_header(
    "DPO-Kernels Studio",
    "Diagnose preference data, train DPO with kernels and divergences, and explain the result.",
)

ws = workspace()
datasets = dataset_store().list()
jobs = job_store().list(limit=500)
workers = job_store().alive_workers(max_age_s=30)
# the same list the Runs and Compare pages show: queued/worker runs and runs written from the command line
training_runs = workspace_runs(ws, job_store())

c = st.columns(4)
c[0].metric("Datasets", len(datasets))
own_runs = [e for e in training_runs if not e.example]
c[1].metric(
    "Training runs",
    len(own_runs),
    help=None if own_runs else f"{len(training_runs)} shipped example runs are shown until you train",
)
c[2].metric("Jobs running", sum(1 for j in jobs if j.status == "running"))
c[3].metric("Workers alive", len(workers))
if not workers:
    st.warning("No worker is running: queued jobs wait until one starts (`dpo-kernels worker`).")
else:
    st.caption("Workers: " + ", ".join(f"{w.id} ({w.device})" for w in workers))

st.subheader("From data to an explained model")
steps = st.columns(3)
with steps[0]:
    st.markdown(
        "**1 · Datasets**  \nUpload JSONL, JSON, CSV or Parquet (optionally .gz): flat columns, "
        "TRL conversations or raw HH-RLHF dialogues. Every flagged row is listed before saving."
    )
    page_link("datasets.py", label="Open Datasets", icon=":material/folder_open:")
with steps[1]:
    st.markdown(
        "**2 · Diagnose**  \nEmbed the pairs, compute the eight selection metrics and get the "
        "recommended kernel and divergence, with the rule that fired and a bootstrap confidence."
    )
    page_link("diagnose.py", label="Open Diagnose", icon=":material/biotech:")
with steps[2]:
    st.markdown(
        "**3 · Train and explain**  \nTrain on a worker, watch losses, kernel weights, divergences, "
        "chosen/rejected clusters and HT-SR alpha live; compare runs and export a report."
    )
    page_link("train.py", label="Open Train", icon=":material/rocket_launch:")

st.caption(f"Workspace: `{ws.root}`")
