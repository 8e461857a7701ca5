"""Run monitor: status, curves, kernel weights, divergences, clusters, HT-SR, logs and downloads of one run."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from app.state import job_store, workspace
from app.ui import figure_with_export, format_seconds, health_alerts, job_status_panel, page_header
from dpo_engine.analysis import health
from dpo_engine.analysis.audit.label_noise import (
    POLICY_CANDIDATES_EXPLANATION,
    policy_candidates,
    policy_reliability,
)
from dpo_engine.analysis.health import health_of
from dpo_engine.analysis.projections import ProjectionConfig, cached_projection, projection_cache_file
from dpo_engine.report import build_report
from dpo_engine.report.archive import DEFAULT_EXCLUDES, zip_directory
from dpo_engine.report.rundata import (
    EXAMPLE_MARK,
    load_dataset_texts,
    load_run,
    run_dataset_texts,
    texts_note,
    workspace_runs,
)
from dpo_engine.report.summary import plain_summary
from dpo_engine.rundir import config_value, file_stamp
from dpo_engine.viz import htsr_update as viz_update
from dpo_engine.viz import runs as viz

LIVE_STATUSES = ("queued", "running")
# Above this many points (all snapshots, chosen + rejected) a first projection takes minutes on a
# CPU, so it runs on request instead of blocking the page; afterwards it is read from the cache.
AUTO_PROJECT_MAX_POINTS = 4000

page_header("Runs", "Watch a training run live and inspect what it learned.")

ws = workspace()
store = job_store()
entries = workspace_runs(ws, store)
if not entries:
    st.info("No training runs yet. Start one on the **Train** page (or `dpo-kernels train`).")
    st.stop()
if all(e.example for e in entries):
    st.info(
        f"{EXAMPLE_MARK} These are **example runs** shipped with DPO-Kernels Studio: plain DPO and the pair the "
        "diagnosis recommends, on the bundled PandaLM pairs, trained on a CPU by `scripts/learning_sweep.py` and "
        "evaluated on pairs no choice was made on (docs/RESULTS.md). They are shown until this workspace has a "
        "training run of its own (**Train** page)."
    )

by_id = {e.run_id: e for e in entries}
wanted = st.query_params.get("run_id") or st.session_state.get("run_id")
ids = list(by_id)
if wanted and wanted not in by_id:
    st.warning(f"Run `{wanted}` was not found in this workspace; showing the newest run instead.")
index = ids.index(wanted) if wanted in by_id else 0
# the status is shown (live) under the picker, so the picker's own labels never go stale
run_id = st.selectbox("Run", ids, index=index, format_func=lambda r: by_id[r].live_label, key="runs-select")
if run_id != st.query_params.get("run_id"):
    st.query_params["run_id"] = run_id
st.session_state["run_id"] = run_id
entry = by_id[run_id]


def _status_block(job, run) -> None:
    summary = run.summary or {}
    status = job.status if job is not None else summary.get("status", "unknown")
    if job is not None:
        job_status_panel(job, key="run")
    last = run.metrics.iloc[-1] if not run.metrics.empty else None
    step = int(last["step"]) if last is not None and "step" in last else 0
    max_steps = run.max_steps
    progress = float(job.progress) if job is not None and job.progress else (step / max_steps if max_steps else 0.0)
    elapsed = job.elapsed_s if job is not None else summary.get("wall_time_s")
    eta = None
    if status == "running" and elapsed and 0 < progress < 1:
        eta = elapsed / progress * (1 - progress)
    cols = st.columns(5)
    cols[0].metric("Status", status)
    cols[1].metric("Step", f"{step} / {max_steps}" if max_steps else str(step))
    cols[2].metric("ETA", format_seconds(eta) if eta is not None else "–")
    tps = last.get("tokens_per_s") if last is not None else summary.get("tokens_per_s")
    cols[3].metric("Tokens/s", f"{float(tps):,.0f}" if tps is not None and pd.notna(tps) else "–")
    acc = viz.accuracy_text(run)
    cols[4].metric(
        "Reward accuracy (eval)",
        acc,
        help=viz.TIE_EXPLANATION
        if acc.startswith("ties")
        else "Share of held-out pairs with chosen reward > rejected.",
    )
    error = summary.get("error") or (job.error if job is not None else None)
    if status == "failed":
        st.error(f"This run failed: {error or 'no error message was recorded'}")
        tail = run.log_tail(60)
        st.caption("Last lines of log.txt")
        st.code(tail or "(log.txt is empty)", language=None)
    elif status == "cancelled":
        st.warning(f"This run was cancelled at step {step}." + (f" {error}" if error else ""))
    elif status == "queued":
        st.info("Queued: waiting for a worker to pick the job up. Nothing has been written yet.")
    for warning in run.warnings:
        st.warning(warning)


def _curves(run) -> None:
    if run.metrics.empty and run.eval.empty:
        st.info("No training steps logged yet.")
        return
    left, right = st.columns(2)
    with left:
        figure_with_export(viz.loss_figure(run.metrics, run.eval), key="run-loss")
        figure_with_export(viz.reward_margin_figure(run.metrics, run.eval), key="run-margins")
        figure_with_export(viz.throughput_figure(run.metrics), key="run-throughput")
    with right:
        figure_with_export(viz.reward_accuracy_figure(run.metrics, run.eval), key="run-acc")
        st.caption(viz.TIE_EXPLANATION)
        figure_with_export(viz.learning_rate_figure(run.metrics), key="run-lr")


def _kernel_weights(run) -> None:
    fig = viz.kernel_weight_figure(run.metrics)
    if fig is None:
        st.info(
            f"Kernel `{run.kernel_name}` has no mixture weights: weight evolution is shown for `mixture` and `hmk` "
            "runs."
        )
    else:
        figure_with_export(fig, key="run-kernel-weights")
        collapse = health.kernel_weight_collapse(run.metrics)
        if collapse is not None:
            st.warning(f"{collapse.title}: {collapse.evidence}")
    if run.epsilon_dpo > 0:
        beta = viz.beta_figure(run.metrics)
        if beta is not None:
            figure_with_export(beta, key="run-beta")


def _divergences(run) -> None:
    fig = viz.divergence_figure(run.eval, run.divergence_name)
    if fig is None:
        st.info("No evaluation logged yet: divergences appear after the first eval.")
        return
    figure_with_export(fig, key="run-divergences")
    st.caption(f"Regulariser: **{run.divergence_name}** (bold). All seven are measured on the held-out pairs.")


def _clusters(run) -> None:
    if not run.snapshot_steps:
        st.info("No snapshots yet: the probe set is snapshotted at step 0, every snapshot_every steps and at the end.")
        return
    c1, c2 = st.columns(2)
    method = c1.radio(
        "Projection",
        ["tsne", "umap"],
        horizontal=True,
        key="clusters-method",
        format_func=lambda m: {"tsne": "t-SNE", "umap": "UMAP"}[m],
    )
    dim = c2.radio("Dimensions", [2, 3], horizontal=True, key="clusters-dim", format_func=lambda d: f"{d}-D")
    config = ProjectionConfig(method=method, dim=dim)
    separation = viz.separation_table(run)
    try:
        n_points = 2 * len(run.snapshot_steps) * len(run.load_snapshot(run.snapshot_steps[-1]).pair_ids)
    except (OSError, ValueError, KeyError):  # a snapshot being written: estimate from the settings
        n_points = (
            2 * len(run.snapshot_steps) * int(((run.config or {}).get("monitoring") or {}).get("probe_pairs") or 0)
        )
    if (
        n_points > AUTO_PROJECT_MAX_POINTS
        and not projection_cache_file(run, config).exists()
        and not st.button(f"Compute the {dim}-D projection of {len(run.snapshot_steps)} snapshots", key="project-now")
    ):
        st.info(f"The projection of about {n_points:,} points is not cached yet; computing it takes a while on a CPU.")
    else:
        _cluster_map(run, config, method, separation)
    left, right = st.columns(2)
    with left:
        figure_with_export(viz.dbs_figure(separation), key="run-dbs")
    with right:
        figure_with_export(viz.probe_figure(separation), key="run-probe")
    st.caption(viz.SEPARATION_EXPLANATION)
    st.dataframe(separation, hide_index=True)


def _cluster_map(run, config, method, separation) -> None:
    try:
        with st.spinner("Projecting snapshots (cached after the first time)…"):
            projection, _ = cached_projection(run, config)
        texts = _pair_texts(run)
        note = texts_note(run.run_dir, config_value(run.config, "data", "dataset"))
        if note:
            st.caption(note)
        label = {"tsne": "t-SNE", "umap": "UMAP"}[method]
        figure_with_export(
            viz.cluster_figure(projection, texts, method=label, separation=viz.separation_by_step(separation)),
            key="run-clusters",
        )
    except ValueError as exc:
        st.warning(f"Projection unavailable: {exc}")


def _htsr(run) -> None:
    if run.htsr_before is None and run.htsr_after is None and run.htsr_update is None:
        st.info(
            "No WeightWatcher analysis in this run yet. It runs before and after training when monitoring.htsr "
            "is on, or auto with a model under 1B parameters; for a larger model, run an HT-SR job on the "
            "saved model from the HT-SR page."
        )
        return
    st.markdown(viz.ALPHA_EXPLANATION)
    before, after = run.weighted_alpha()
    c1, c2 = st.columns(2)
    c1.metric("Weighted alpha before", f"{before:.3f}" if before is not None else "–")
    c2.metric(
        "Weighted alpha after",
        f"{after:.3f}" if after is not None else "–",
        delta=f"{after - before:+.3f}" if before is not None and after is not None else None,
        delta_color="off",
    )
    if config_value(run.config, "model", "lora"):
        st.caption(viz_update.LORA_WEIGHTED_ALPHA_NOTE)
    figure_with_export(viz.htsr_alpha_figure(run.htsr_before, run.htsr_after), key="run-htsr")
    left = health.htsr_left_range(run.htsr_before, run.htsr_after)
    st.markdown(f"**Layers that left [2, 6] during training:** {len(left)}")
    if not left.empty:
        st.dataframe(left, hide_index=True)
    note = viz_update.base_range_note(run.htsr_before)
    if note:
        st.caption(note)
    st.subheader("What training changed (HT-SR of the update)")
    if run.htsr_update is None:
        st.info(
            "No update table in this run: htsr_update.csv is written at the end of a run with HT-SR on "
            "(runs from before this analysis have none)."
        )
        return
    st.markdown(viz_update.UPDATE_EXPLANATION)
    fig = viz_update.update_figure(run.htsr_update)
    if fig is None:
        st.info("Training changed no layer's weights.")
    else:
        figure_with_export(fig, key="run-htsr-update")
    flagged = viz_update.update_flag_table(run.htsr_update)
    if not flagged.empty:
        st.markdown(f"**Layers whose update alpha is flagged:** {len(flagged)}")
        st.dataframe(flagged, hide_index=True)
    with st.expander("Per-layer update table (skipped layers with the reason)"):
        st.dataframe(viz_update.update_display_table(run.htsr_update), hide_index=True)


@st.cache_resource(max_entries=4, show_spinner="Reading the dataset's texts ...")
def _dataset_texts(dataset: str | None, version: tuple | None) -> pd.DataFrame | None:
    """One shared copy per dataset version (not copied per rerun as cache_data would); never modified.
    `version` (a file's size and modification time) makes a changed file be read again."""
    return load_dataset_texts(ws, dataset)


def _cached_texts(_workspace, dataset: str | None) -> pd.DataFrame | None:
    stamp = file_stamp(dataset) if dataset else None
    return _dataset_texts(dataset, None if stamp is None else (stamp["size"], stamp["mtime_ns"]))


def _pair_texts(run) -> pd.DataFrame | None:
    """The texts of the run's pairs; None when its dataset is unavailable or its file changed since the run."""
    return run_dataset_texts(ws, run.run_dir, config_value(run.config, "data", "dataset"), load=_cached_texts)


def _disagreements(run) -> None:
    found = policy_candidates(run.run_dir)
    if found is None:
        st.info(
            "No evaluation since training began: the held-out pairs the policy disagrees with appear after the "
            "first evaluation past step 0."
        )
        return
    step, candidates = found
    st.markdown(
        f"{POLICY_CANDIDATES_EXPLANATION} (Evaluation at step {step}.)"
        if len(candidates)
        else f"At step {step} the policy prefers the chosen response of every held-out pair it scored."
    )
    reliability = policy_reliability()
    if reliability:
        st.caption(reliability)
    if candidates.empty:
        return
    texts = _pair_texts(run)
    table = candidates if texts is None else candidates.join(texts, on="pair_id")
    note = texts_note(run.run_dir, config_value(run.config, "data", "dataset"))
    if note:
        st.caption(note)
    st.dataframe(table, hide_index=True, width="stretch")
    st.download_button(
        "Download these pairs (.csv)",
        lambda: table.to_csv(index=False),
        file_name=f"{run.run_id}-held-out-disagreements.csv",
        mime="text/csv",
        key="disagreements-csv",
    )


def _files(job, run) -> None:
    if job is not None and job.status in LIVE_STATUSES and not job.cancel_requested:
        if st.button("Cancel run", key="cancel-run", type="secondary"):
            store.request_cancel(job.id)
            st.rerun()
    cols = st.columns(3)
    if run.run_dir.is_dir():
        cols[0].download_button(
            "Run directory (.zip)",
            lambda: zip_directory(run.run_dir, exclude=DEFAULT_EXCLUDES),
            file_name=f"{run.run_id}.zip",
            mime="application/zip",
            key="zip-run",
        )
    if (run.run_dir / "model").is_dir():
        cols[1].download_button(
            "Model / adapter (.zip)",
            lambda: zip_directory(run.run_dir / "model", root_name=f"{run.run_id}-model"),
            file_name=f"{run.run_id}-model.zip",
            mime="application/zip",
            key="zip-model",
        )
    else:
        cols[1].caption("The trained model appears here when the run finishes.")
    cols[2].download_button(
        "Download report (.html)",
        lambda: build_report(ws, [run.run_id]),
        file_name=f"{run.run_id}-report.html",
        mime="text/html",
        key="report-run",
    )
    st.caption("Log (last 200 lines)")
    st.code(run.log_tail(200) or "(log.txt is empty)", language=None)
    if run.config:
        with st.expander("Resolved configuration (config.json)"):
            st.code(json.dumps(run.config, indent=2), language="json")


def _body(run_id: str) -> None:
    current = next((e for e in workspace_runs(ws, store) if e.run_id == run_id), entry)
    job = store.get(current.job.id) if current.job is not None else None
    run = load_run(current.run_dir, run_id)
    _status_block(job, run)
    if not run.is_empty:
        with st.container(border=True):
            st.markdown("**In plain words**\n\n" + plain_summary([run]).markdown())
    health_alerts(health_of(run))
    if job is not None and job.status not in LIVE_STATUSES and st.session_state.get("run-was-live") == run_id:
        st.session_state.pop("run-was-live")
        st.rerun()  # finished while watched: redraw once without auto-refresh
    tabs = st.tabs(
        [
            "Curves",
            "Kernel weights",
            "Divergences",
            "Clusters",
            "Generalisation (HT-SR)",
            "Held-out disagreements",
            "Logs & files",
        ]
    )
    if run.is_empty:
        with tabs[0]:
            st.info("Nothing to plot yet.")
    else:
        with tabs[0]:
            _curves(run)
        with tabs[1]:
            _kernel_weights(run)
        with tabs[2]:
            _divergences(run)
        with tabs[3]:
            _clusters(run)
        with tabs[4]:
            _htsr(run)
        with tabs[5]:
            _disagreements(run)
    with tabs[6]:
        _files(job, run)


live = entry.job is not None and entry.job.status in LIVE_STATUSES
if live:
    st.session_state["run-was-live"] = run_id
    st.caption("🔄 Live: this view refreshes every 2 seconds while the run is active.")
st.fragment(_body, run_every=2 if live else None)(run_id)
