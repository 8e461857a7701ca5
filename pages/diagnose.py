"""Diagnose: the eight selection metrics, the recommended kernel and divergence, why, and how sure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from app.state import dataset_store, job_store, workspace
from app.ui import figure_with_export, job_status_panel, page_header, switch_page
from dpo_engine.analysis.audit import AUDIT_FLAGGED
from dpo_engine.data.preflight import SIDES, TokenPreflight
from dpo_engine.embed import DEFAULT_EMBEDDER
from dpo_engine.models import KNOWN_MODELS
from dpo_engine.selection import Thresholds, load_diagnosis, recommend_again
from dpo_engine.train.presets import preset_overrides
from dpo_engine.train.sweep import DEFAULT_PRESET, submit_sweep, sweep_pairs
from dpo_engine.viz import audit as aviz
from dpo_engine.viz import diagnosis as dviz

page_header(
    "Diagnose",
    "Embed a dataset, compute the DPO-Kernels selection metrics and get a kernel–divergence "
    "recommendation with the rules that decided it.",
)

store = dataset_store()
infos = store.list()
if not infos:
    st.info("No datasets yet: add one on the Datasets page first.")
    st.stop()

ids = [i.id for i in sorted(infos, key=lambda i: i.created_at, reverse=True)]  # newest first
default = st.session_state.get("diagnose_dataset")
dataset_id = st.selectbox(
    "Dataset",
    ids,
    index=ids.index(default) if default in ids else 0,
    format_func=lambda d: f"{store.get(d).name} ({store.get(d).n_pairs} pairs)",
)
st.session_state["diagnose_dataset"] = dataset_id

with st.expander("Embedding options"):
    oc = st.columns(4)
    embedder = oc[0].text_input(
        "Embedder",
        value=DEFAULT_EMBEDDER,
        help="A sentence-transformers model name or local path (default: bundled all-MiniLM-L6-v2).",
    )
    distance = oc[1].selectbox("Distance", ["cosine", "euclidean"], help="d(a, b) = 1 − cos(a, b) by default.")
    max_pairs = oc[2].number_input("Max pairs (0 = all)", min_value=0, value=0, step=100)
    n_bootstrap = oc[3].number_input("Bootstrap resamples", min_value=0, max_value=2000, value=200, step=50)

with st.expander("Token pre-flight options (the tokenizer and limits training will use)"):
    pc = st.columns(3)
    preflight_model = pc[0].selectbox(
        "Model",
        list(KNOWN_MODELS),
        help="The model chosen on the Train form: its tokenizer for the pre-flight, its log-probs for the "
        "label-noise signal.",
    )
    max_length = pc[1].number_input(
        "max_length", min_value=8, value=256, step=16, help="Maximum tokens of prompt + response in training."
    )
    max_prompt_length = pc[2].number_input("max_prompt_length (0 = half of max_length)", min_value=0, value=0, step=16)

jobs = [j for j in job_store().list(kind="diagnose", limit=200) if j.params.get("dataset") == dataset_id]
if st.button("Run diagnosis", type="primary"):
    params = {
        "dataset": dataset_id,
        "embedder": embedder,
        "distance": distance,
        "max_pairs": int(max_pairs) or None,
        "n_bootstrap": int(n_bootstrap),
        "preflight_model": preflight_model,
        "max_length": int(max_length),
        "max_prompt_length": int(max_prompt_length) or None,
    }
    job = job_store().submit("diagnose", params, title=f"diagnose {store.get(dataset_id).name}")
    st.toast(f"Diagnosis job #{job.id} queued")
    jobs.insert(0, job)

if not jobs:
    st.info("This dataset has not been diagnosed yet: press **Run diagnosis** (it runs as a job on a worker).")
    st.stop()

latest = jobs[0]
done = next((j for j in jobs if j.status == "succeeded"), None)


@st.fragment(run_every=2)
def live_status(job_id: int) -> None:
    job = job_store().get(job_id)
    job_status_panel(job, key="diagnose")
    if job.status == "succeeded":
        st.rerun(scope="app")


if latest.status in ("queued", "running"):
    live_status(latest.id)
elif latest.status in ("failed", "cancelled"):
    job_status_panel(latest, key="diagnose-last")

if done is None:
    st.stop()


@st.cache_data(show_spinner="Loading the diagnosis…", max_entries=16)
def _load(run_dir: str, stamp: float):
    return load_diagnosis(run_dir)


def _table_with_export(frame: pd.DataFrame, label: str, file_name: str, key: str, height: int) -> None:
    st.dataframe(frame, hide_index=True, width="stretch", height=height)
    st.download_button(label, frame.to_csv(index=False), file_name=file_name, mime="text/csv", key=key)


run_dir = Path(done.run_dir)
base = _load(str(run_dir), (run_dir / "diagnosis.json").stat().st_mtime)
info = json.loads((run_dir / "diagnosis.json").read_text()).get("dataset", {})
st.caption(
    f"Diagnosis of job #{done.id} · {base.n_pairs} pairs · embedder {base.embedder} · "
    f"{base.distance} distance · {base.n_bootstrap} bootstrap resamples"
)

with st.expander("Thresholds (edit to re-apply the rules; no re-embedding)"):
    defaults = base.thresholds
    values = {}
    tcols = st.columns(4)
    for k, (name, field) in enumerate(Thresholds.model_fields.items()):
        values[name] = tcols[k % 4].number_input(
            name,
            value=float(getattr(defaults, name)),
            step=0.05,
            format="%.3f",
            help=field.description,
            key=f"thr-{name}",
        )
diagnosis = recommend_again(base, values) if values != defaults.model_dump() else base
rec = diagnosis.recommendation

st.subheader("Recommendation")
rc = st.columns(4)
rc[0].metric("Kernel", rec.kernel, help=diagnosis.kernel_evaluation.rule)
rc[1].metric(
    "Kernel confidence",
    f"{100 * rec.confidence.kernel.get(rec.kernel, 0):.0f}%",
    delta="uncertain" if rec.kernel_uncertain else None,
    delta_color="inverse",
)
rc[2].metric("Divergence", rec.divergence, help=diagnosis.divergence_evaluation.rule)
rc[3].metric(
    "Divergence confidence",
    f"{100 * rec.confidence.divergence.get(rec.divergence, 0):.0f}%",
    delta="uncertain" if rec.divergence_uncertain else None,
    delta_color="inverse",
)
for kind in ("kernel", "divergence"):
    if getattr(rec, f"{kind}_uncertain"):
        st.warning(
            f"**{kind.capitalize()}: {getattr(rec, f'{kind}_verdict')}.** Fewer than half of the bootstrap "
            "resamples back the point estimate's choice; treat it as a tie and consider training both."
        )
st.markdown(
    f"**Kernel rule:** {diagnosis.kernel_evaluation.rule}  \n"
    f"**Divergence rule:** {diagnosis.divergence_evaluation.rule}"
)
if rec.kernel_runner_up or rec.divergence_runner_up:
    st.caption(
        f"Runner-up kernel: {rec.kernel_runner_up or '–'} "
        f"(distance {diagnosis.kernel_evaluation.runner_up_distance}); runner-up divergence: "
        f"{rec.divergence_runner_up or '–'} (distance {diagnosis.divergence_evaluation.runner_up_distance}); "
        f"distances in {diagnosis.kernel_evaluation.gap_unit.replace('_', ' ')}."
    )
if st.button("Train with this recommendation", type="primary"):
    st.session_state["recommendation"] = {
        "kernel": rec.kernel,
        "divergence": rec.divergence,
        "dataset_id": dataset_id,
        "source": done.run_id,
    }
    st.success(f"{rec.kernel} + {rec.divergence} handed to the Train page, where the form is prefilled.")
    switch_page("train.py")

st.markdown(
    "**Check the recommendation on this dataset.** One click queues a short sweep: "
    + ", ".join(f"**{p.label}** ({p.role})" for p in sweep_pairs(rec.model_dump()))
    + f", each a train job with the `{DEFAULT_PRESET}` preset and the same seed and split. "
    "The **Compare** page then shows whether the recommended pair came out ahead, with 95 % intervals."
)
with st.expander("Sweep settings (on top of the preset)"):
    sweep_cols = st.columns(2)
    sweep_model = sweep_cols[0].text_input(
        "Model of every run",
        value=preset_overrides(DEFAULT_PRESET)["model.name"],
        key="sweep-model",
        help="Policy model of every run in the sweep.",
    )
    sweep_steps = sweep_cols[1].number_input(
        "Steps per run",
        min_value=1,
        key="sweep-steps",
        value=int(preset_overrides(DEFAULT_PRESET)["optimisation.max_steps"]),
        help="Optimiser steps of each run (more steps, narrower intervals).",
    )
if st.button("Queue a sweep: recommended pair vs runners-up", key="sweep-launch"):
    try:
        record = submit_sweep(
            {"recommendation": rec.model_dump()},
            dataset_id,
            job_store(),
            workspace(),
            overrides={"model.name": sweep_model.strip(), "optimisation.max_steps": int(sweep_steps)},
            source=done.run_id,
        )
    except Exception as exc:  # config, dataset and model errors carry a one-line message
        st.error(f"Sweep not queued: {str(exc).splitlines()[0]}")
    else:
        st.session_state["sweep_id"] = record["sweep_id"]
        st.success(
            f"Queued sweep `{record['sweep_id']}`: {len(record['runs'])} train jobs. "
            "Open the **Compare** page to follow it."
        )

st.subheader("Selection metrics")
se = diagnosis.standard_errors()
m = diagnosis.metrics
st.dataframe(
    pd.DataFrame(
        [
            {"metric": name, "value": getattr(m, name), "bootstrap s.e.": se.get(name), "used for": group}
            for group, names in (
                ("kernel", ("pnd", "pnav", "tat", "nag")),
                ("divergence", ("support_overlap", "drift_magnitude", "kurtosis", "smoothness")),
            )
            for name in names
        ]
    ),
    hide_index=True,
    width="stretch",
)


def _rules_frame(evaluation) -> pd.DataFrame:
    rows = []
    for rule in evaluation.rules:
        if not rule.conditions:
            rows.append(
                {
                    "rule": rule.name,
                    "condition": "fallback (always matches)",
                    "value": None,
                    "threshold": None,
                    "passed": True,
                    "fired": rule.fired,
                }
            )
        for c in rule.conditions:
            metric = f"|{c.metric}|" if c.absolute else c.metric
            rows.append(
                {
                    "rule": rule.name,
                    "condition": f"{metric} {c.comparison} {c.threshold_name or c.threshold}",
                    "value": c.value,
                    "threshold": c.threshold,
                    "passed": c.passed,
                    "fired": rule.fired,
                }
            )
    return pd.DataFrame(rows)


st.subheader("Why: every rule, first match wins")
tc = st.columns(2)
tc[0].markdown("**Kernel rules**")
tc[0].dataframe(_rules_frame(diagnosis.kernel_evaluation), hide_index=True, width="stretch")
tc[1].markdown("**Divergence rules**")
tc[1].dataframe(_rules_frame(diagnosis.divergence_evaluation), hide_index=True, width="stretch")

st.subheader("How sure: bootstrap confidence")
figure_with_export(dviz.confidence_figure(diagnosis), key="confidence")

st.subheader("The data behind the metrics")
figs = dviz.diagnosis_figures(diagnosis)
gc = st.columns(2)
for k, key in enumerate(("distances", "margins", "tat", "overlap")):
    with gc[k % 2]:
        figure_with_export(figs[key], key=key)
figure_with_export(figs["smoothness"], key="smoothness")


st.subheader("Token pre-flight: what training will cut")
if info_preflight := json.loads((run_dir / "diagnosis.json").read_text()).get("token_preflight"):
    pf = TokenPreflight(**info_preflight)
    st.caption(
        f"Tokenizer of {pf.model}{' with its chat template' if pf.chat_template else ''}; "
        f"max_length {pf.max_length}, max_prompt_length {pf.max_prompt_length}."
    )
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "side": side,
                    "mean tokens": round(pf.lengths[side].mean, 1),
                    **{k: v for k, v in pf.lengths[side].quantiles.items()},
                    "max": pf.lengths[side].max,
                    "pairs cut": pf.cut[side].pairs_cut,
                    "share cut": f"{pf.cut[side].share_cut:.0%}",
                    "mean tokens lost": round(pf.cut[side].mean_tokens_lost, 1),
                }
                for side in SIDES
            ]
        ),
        hide_index=True,
        width="stretch",
    )
    (st.warning if pf.pairs_cut else st.success)(
        f"{pf.pairs_cut} of {pf.n_pairs} pairs lose tokens with these limits. Suggested: max_length "
        f"{pf.suggestion.max_length}, max_prompt_length {pf.suggestion.max_prompt_length} "
        f"({pf.suggestion.pairs_cut} pairs cut then; {pf.suggestion.reason})."
    )
    st.markdown("**A few pairs as the model will see them** (after truncation)")
    st.dataframe(pf.examples_frame(), hide_index=True, width="stretch")
else:
    st.info("This diagnosis ran without a token pre-flight: run it again to see token lengths and truncation.")


st.subheader("Data audit: length bias, repeats, conflicts, leakage")
if audit := json.loads((run_dir / "diagnosis.json").read_text()).get("audit"):
    split = audit["split"]
    st.caption(
        f"Leakage is checked on the split the Train form will use: by {split['split_by']}, seed {split['seed']}, "
        f"{split['eval_fraction']:.0%} held out (at least {split['min_eval_pairs']} pairs). Thresholds and formulas: "
        "docs/METHOD.md 1.5."
    )
    findings = aviz.findings_table(audit)
    warnings = int((findings["status"] == "warning").sum()) if not findings.empty else 0
    (st.warning if warnings else st.success)(
        f"{warnings} finding(s) to act on." if warnings else "No finding to act on."
    )
    st.dataframe(findings, hide_index=True, width="stretch")
    st.dataframe(aviz.leakage_table(audit), hide_index=True, width="stretch")
    lc = st.columns(2)
    for k, unit in enumerate(("characters", "tokens")):
        if (fig := aviz.length_difference_figure(audit, unit)) is not None:
            with lc[k]:
                figure_with_export(fig, key=f"length-{unit}")
    flagged_path = run_dir / AUDIT_FLAGGED
    if flagged_path.is_file():
        flagged = pd.read_parquet(flagged_path)
        st.markdown(f"**Flagged pairs** ({len(flagged)} rows, one per pair and finding)")
        _table_with_export(flagged, "Export flagged pairs (CSV)", f"audit-{dataset_id}.csv", "audit-export", 300)
    if by_group := audit.get("by_group"):
        st.markdown("**Per group** (the audit and the eight metrics on each category or source)")
        st.caption(aviz.pooled_note(by_group))
        st.dataframe(aviz.group_table(by_group), hide_index=True, width="stretch")
        if (fig := aviz.group_length_figure(by_group, "characters")) is not None:
            figure_with_export(fig, key="length-by-group")
else:
    st.info("This diagnosis ran without a data audit: run it again to see length bias, duplicates and leakage.")


@st.cache_data(show_spinner=False, max_entries=8)
def _table(dataset: str, n: int) -> pd.DataFrame:
    return store.load(dataset).head(n).reset_index(drop=True)


table = None
if info.get("dataset_id"):
    try:
        table = _table(info["dataset_id"], diagnosis.n_pairs)
    except Exception:  # noqa: BLE001 - the dataset may have been deleted since
        table = None

with st.expander("2-D map of prompt, chosen and rejected embeddings"):
    method = st.radio(
        "Projection", ["umap", "tsne"], horizontal=True, format_func=lambda x: "UMAP" if x == "umap" else "t-SNE"
    )
    if st.button("Draw the map"):
        st.session_state["diagnose_map"] = (str(run_dir), method)
    if st.session_state.get("diagnose_map") == (str(run_dir), method):

        @st.cache_data(show_spinner="Projecting embeddings…", max_entries=8)
        def _map(run: str, how: str, _table):
            with np.load(Path(run) / "embeddings.npz") as z:
                return dviz.embedding_map(z["prompt"], z["chosen"], z["rejected"], table=_table, method=how)

        figure_with_export(_map(str(run_dir), method, table), key=f"map-{method}")

st.subheader("Label noise: pairs whose labels may be swapped")
if not audit or not audit.get("label_noise"):
    st.info("This diagnosis ran without label-noise signals: run it again (with the data audit) to rank them.")
else:
    st.caption(aviz.label_noise_note(audit) + " Formulas and the measurement: docs/METHOD.md 1.6.")
    st.dataframe(aviz.label_noise_table(audit), hide_index=True, width="stretch")
    if flagged_path.is_file():
        noisy = pd.read_parquet(flagged_path).query("finding == 'label_noise'").dropna(axis=1, how="all")
        if len(noisy):
            _table_with_export(
                noisy, "Export label-noise candidates (CSV)", f"label-noise-{dataset_id}.csv", "label-noise-export", 360
            )
