"""Compare runs: overlaid curves, final accuracy, DBS and linear-probe accuracy per snapshot (Table 13
layout), weighted alpha, kernel × divergence grid."""

from __future__ import annotations

import streamlit as st

from app.state import job_store, workspace
from app.ui import figure_with_export, page_header
from dpo_engine.analysis.health import alerts_table, health_of
from dpo_engine.report import build_report
from dpo_engine.report.rundata import EXAMPLE_MARK, load_run, workspace_runs
from dpo_engine.train.sweep import list_sweeps, sweep_outcome
from dpo_engine.viz import runs as viz

page_header("Compare runs", "Put several runs side by side: curves, final accuracy, cluster separation and HT-SR.")

ws = workspace()
entries = workspace_runs(ws, job_store())
if not entries:
    st.info("No training runs yet. Start some on the **Train** page.")
    st.stop()
if all(e.example for e in entries):
    st.info(
        f"{EXAMPLE_MARK} Comparing the **example runs** shipped with DPO-Kernels Studio (plain DPO vs HMK on the "
        "bundled HH sample, quick preset); they are shown until this workspace has a training run of its own."
    )
by_id = {e.run_id: e for e in entries}

sweeps = list_sweeps(ws)
if sweeps:
    st.subheader("Sweep: did the recommended pair come out ahead?")
    sweep_ids = [r["sweep_id"] for r in sweeps]
    wanted_sweep = st.session_state.get("sweep_id")
    sweep_id = st.selectbox(
        "Sweep",
        sweep_ids,
        key="compare-sweep",
        index=sweep_ids.index(wanted_sweep) if wanted_sweep in sweep_ids else 0,
        format_func=lambda i: f"{i} · dataset {next(r for r in sweeps if r['sweep_id'] == i)['dataset']}",
    )
    record = next(r for r in sweeps if r["sweep_id"] == sweep_id)
    outcome, sweep_verdict = sweep_outcome(record, {e.run_id: e.run_dir for e in entries})
    (st.success if "ahead" in sweep_verdict else st.warning if "behind" in sweep_verdict else st.info)(sweep_verdict)
    st.dataframe(outcome, hide_index=True)
    st.caption(
        "Held-out reward accuracy at each run's last evaluation with a bootstrap 95 % interval over the "
        "held-out pairs; recommended_minus_this = the recommended pair's accuracy minus this run's on the same "
        "pairs, with a paired bootstrap 95 % interval. Same preset, seed and split for every run."
    )
default = [e.run_id for e in entries if e.status == "succeeded"][:3] or [entries[0].run_id]
selected = st.multiselect(
    "Runs", list(by_id), default=default, format_func=lambda r: by_id[r].label, key="compare-runs"
)
if not selected:
    st.info("Pick at least one run.")
    st.stop()

runs = [load_run(by_id[r].run_dir, r) for r in selected]
empty = [r.run_id for r in runs if r.is_empty]
if empty:
    st.caption("No results yet for: " + ", ".join(empty))

st.subheader("Final metrics")
st.dataframe(viz.final_accuracy_table(runs), hide_index=True)
st.caption("“ties (step 0)”: the run has only been evaluated while policy = reference. " + viz.TIE_EXPLANATION)

st.subheader("Run health")
health = [(run.run_id, alerts_table(health_of(run))) for run in runs]
health_rows = [table.assign(run=run_id) for run_id, table in health if not table.empty]
if health_rows:
    import pandas as pd

    table = pd.concat(health_rows, ignore_index=True)
    st.table(table[["run", *[c for c in table.columns if c != "run"]]].set_index("run"))  # full text, wrapped
    st.caption("Each alert names the step where the pattern starts; open the run on the Runs page for what it means.")
else:
    st.caption("✅ No health alerts in the selected runs.")

st.subheader("Curves")
left, right = st.columns(2)
with left:
    figure_with_export(viz.overlay_figure(runs, "loss", title="Training loss", y_title="loss (nats)"), key="cmp-loss")
    figure_with_export(
        viz.overlay_figure(runs, "loss_pref", source="eval", title="Held-out preference loss", y_title="loss (nats)"),
        key="cmp-eval-loss",
    )
with right:
    figure_with_export(
        viz.overlay_figure(
            runs, "reward_acc", source="eval", title="Held-out reward accuracy", y_title="accuracy (fraction)"
        ),
        key="cmp-acc",
    )
    figure_with_export(
        viz.overlay_figure(
            runs,
            "dbs",
            source="eval",
            title="Davies–Bouldin score (full-dimensional)",
            y_title="Davies–Bouldin score (dimensionless)",
        ),
        key="cmp-dbs",
    )

st.subheader("Separation of chosen and rejected per snapshot")
st.caption("Rows = steps, columns = runs. " + viz.SEPARATION_EXPLANATION)
left, right = st.columns(2)
left.markdown("**Davies–Bouldin score**")
left.dataframe(viz.separation_comparison_table(runs, "dbs"))
right.markdown("**Linear-probe accuracy (95 % interval)**")
right.dataframe(viz.separation_comparison_table(runs, "probe_acc"))

st.subheader("Weighted alpha")
figure_with_export(viz.weighted_alpha_figure([(r.run_id, *r.weighted_alpha()) for r in runs]), key="cmp-alpha")

st.subheader("Kernel × divergence")
grid_fig, _ = viz.kernel_divergence_grid(runs)
figure_with_export(grid_fig, key="cmp-grid")

st.download_button(
    "Download report (.html)",
    lambda: build_report(ws, selected),
    file_name="dpo-kernels-comparison.html",
    mime="text/html",
    key="report-compare",
)
