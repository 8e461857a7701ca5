"""The stakeholder report: one self-contained HTML file that opens with the answer in plain words
(dpo_engine.report.summary), then every plot, the alerts, the diagnosis and the configuration, and
ends with what the runs cost (time, throughput, memory).

It must open offline and by e-mail attachment, so plotly.js is embedded inline exactly once (in
the head) and every figure is a bare div + inline script; there are no external scripts,
stylesheets, fonts or images. Figures come from dpo_engine.viz.runs, the same ones the app shows.
"""

from __future__ import annotations

import html
import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from dpo_engine.analysis import health
from dpo_engine.analysis.audit.label_noise import (
    POLICY_CANDIDATES_EXPLANATION,
    policy_candidates,
    policy_reliability,
)
from dpo_engine.analysis.health import health_of
from dpo_engine.analysis.projections import ProjectionConfig, cached_projection
from dpo_engine.report.rundata import (
    EXAMPLE_MARK,
    EXAMPLES_DIR_NAME,
    RunData,
    example_run_dir,
    load_run,
    run_dataset_texts,
    texts_note,
)
from dpo_engine.report.summary import PlainSummary, plain_summary
from dpo_engine.rundir import config_value
from dpo_engine.viz import audit as audit_viz
from dpo_engine.viz import htsr_update as viz_update
from dpo_engine.viz import runs as viz
from dpo_engine.viz.style import CHOSEN_COLOR, NEUTRAL_COLOR, REJECTED_COLOR

SECTION_TITLES = {  # in the order the report shows them
    "summary": "Summary in plain words",
    "curves": "Training curves",
    "kernel_weights": "Kernel weights",
    "divergences": "Divergences",
    "clusters": "Clusters: Davies–Bouldin score and linear probe",
    "htsr": "Generalisation (HT-SR)",
    "disagreements": "Held-out disagreements (label-noise candidates)",
    "compare": "Comparison of runs",
    "health": "Run health",
    "diagnosis": "Dataset diagnosis",
    "configuration": "Configuration",
    "cost": "Cost",
}
COST_COLUMNS = ("status", "device", "wall_time_s", "train_time_s", "tokens_per_s", "peak_memory_mb")

_CSS = f"""
body {{ font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2rem auto; max-width: 1200px;
       color: #222; line-height: 1.45; padding: 0 1rem; }}
h1 {{ border-bottom: 3px solid {CHOSEN_COLOR}; padding-bottom: .3rem; }}
h2 {{ margin-top: 2.5rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem; }}
table {{ border-collapse: collapse; margin: .8rem 0; font-size: .9rem; }}
th, td {{ border: 1px solid #ddd; padding: .25rem .6rem; text-align: left; }}
th {{ background: #f4f4f4; }}
.note {{ color: {NEUTRAL_COLOR}; font-size: .9rem; }}
.warn {{ color: {REJECTED_COLOR}; }}
.pass {{ color: {CHOSEN_COLOR}; font-weight: 600; }} .fail {{ color: {REJECTED_COLOR}; }}
.toc a {{ margin-right: 1rem; }}
pre {{ background: #f7f7f7; padding: .6rem; overflow-x: auto; font-size: .8rem; }}
.alert {{ border-left: 5px solid; padding: .4rem .8rem; margin: .6rem 0; background: #fafafa; }}
.alert.error {{ border-color: {REJECTED_COLOR}; }} .alert.warning {{ border-color: #E69F00; }}
.alert.info {{ border-color: #56B4E9; }}
.alert .what {{ color: #333; }}
.figure {{ margin: 0 0 2.2rem 0; }}
"""


class ReportError(ValueError):
    """A report cannot be built from what was asked (unknown run, no run ids)."""


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _table(frame: pd.DataFrame, *, index: bool = False, float_format: str = "{:.4g}") -> str:
    if frame is None or frame.empty:
        return "<p class='note'>No data.</p>"
    formatted = frame.copy()
    for column in formatted.columns:
        if pd.api.types.is_float_dtype(formatted[column]):
            formatted[column] = formatted[column].map(lambda v: "–" if pd.isna(v) else float_format.format(v))
    return formatted.to_html(index=index, escape=True, border=0, na_rep="–")


class _Figures:
    """Turns figures into inline divs; plotly.js itself is written once into the page head."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, fig: go.Figure | None) -> str:
        if fig is None:
            return ""
        self.count += 1
        return (
            "<div class='figure'>"
            + fig.to_html(
                include_plotlyjs=False,
                full_html=False,
                auto_play=False,
                div_id=f"figure-{self.count}",
                config={"displaylogo": False},
            )
            + "</div>"
        )


_PLAIN_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def resolve_run_dir(workspace, run_or_job_id: str) -> tuple[str, Path]:
    """A run id (directory name under runs/) or a numeric job id -> (run_id, run_dir).

    Only plain names are accepted, so an id can never point outside the workspace's runs/.
    """
    key = str(run_or_job_id).strip()
    if not _PLAIN_RUN_ID.match(key) or ".." in key:
        raise ReportError(f"{key!r} is not a run id (a plain name under {workspace.runs_dir}, or a job number)")
    direct = workspace.run_dir(key)
    if direct.is_dir():
        return key, direct
    example = example_run_dir(workspace, key)
    if example is not None:
        return key, example  # a shipped example run (shown until the workspace has runs of its own)
    if key.isdigit():
        from dpo_engine.jobs import JobStore

        try:
            job = JobStore.for_workspace(workspace).get(int(key))
        except LookupError as exc:
            raise ReportError(f"no run directory and no job with id {key}") from exc
        return job.run_id, Path(job.run_dir)
    known = sorted(p.name for p in workspace.runs_dir.iterdir() if p.is_dir()) if workspace.runs_dir.is_dir() else []
    hint = f"; known runs: {', '.join(known[-10:])}" if known else "; the workspace has no runs"
    raise ReportError(f"unknown run {key!r} in {workspace.runs_dir}{hint}")


def find_diagnosis(workspace, runs: list[RunData]) -> dict | None:
    """The newest finished diagnosis of the first run's dataset, if the job table knows one."""
    dataset = ((runs[0].config or {}).get("data") or {}).get("dataset") if runs else None
    if not dataset:
        return None
    try:
        from dpo_engine.jobs import JobStore

        jobs = JobStore.for_workspace(workspace).list(kind="diagnose", status="succeeded")
    except Exception:  # no job database yet: the report simply has no diagnosis section content
        return None
    for job in sorted(jobs, key=lambda j: j.created_at, reverse=True):
        if str((job.params or {}).get("dataset")) == str(dataset):
            path = Path(job.run_dir) / "diagnosis.json"
            if path.is_file():
                return json.loads(path.read_text()) | {"_source": job.run_id}
    return None


def load_diagnosis_json(workspace, run_or_job_id: str) -> dict:
    run_id, run_dir = resolve_run_dir(workspace, run_or_job_id)
    path = run_dir / "diagnosis.json"
    if not path.is_file():
        raise ReportError(f"{run_id} has no diagnosis.json (is it a finished diagnose job?)")
    return json.loads(path.read_text()) | {"_source": run_id}


# ---------------------------------------------------------------- sections


def _audit_section(audit: dict | None, fig: _Figures) -> str:
    """The data audit of the diagnosis: findings with what to do, leakage per split, length differences."""
    if not audit:
        return "<h3>Data audit</h3><p class='note'>This diagnosis ran without a data audit.</p>"
    split = audit.get("split") or {}
    return (
        "<h3>Data audit</h3>"
        f"<p class='note'>{_esc(audit.get('n_pairs'))} pairs. Leakage on the training split: by "
        f"{_esc(split.get('split_by'))}, seed {_esc(split.get('seed'))}, "
        f"eval fraction {_esc(split.get('eval_fraction'))}."
        " Intervals are 95 % Wilson intervals; thresholds and formulas: METHOD.md 1.5.</p>"
        + _table(audit_viz.findings_table(audit))
        + _table(audit_viz.leakage_table(audit))
        + "".join(fig(audit_viz.length_difference_figure(audit, unit)) for unit in ("characters", "tokens"))
        + _label_noise_part(audit)
        + _group_part(audit.get("by_group"), fig)
    )


def _group_part(by_group: dict | None, fig: _Figures) -> str:
    """The audit and the eight metrics per category or source; nothing when the data has no such column."""
    if not by_group:
        return ""
    return (
        "<h4>Per group</h4>"
        f"<p class='note'>{_esc(audit_viz.pooled_note(by_group))}</p>"
        + _table(audit_viz.group_table(by_group))
        + fig(audit_viz.group_length_figure(by_group, "characters"))
    )


def _label_noise_part(audit: dict) -> str:
    """Label-noise candidates: which signal ranks them and how well each signal found flipped labels."""
    note = audit_viz.label_noise_note(audit)
    if note is None:
        return ""
    return f"<h4>Label noise</h4><p class='note'>{_esc(note)}</p>" + _table(audit_viz.label_noise_table(audit))


def _diagnosis_section(diagnosis: dict | None, fig: _Figures) -> str:
    if not diagnosis:
        return (
            "<p class='note'>No dataset diagnosis was found for these runs. Run a diagnosis on the dataset "
            "(Diagnose page or <code>dpo-kernels diagnose</code>) and pass it with <code>--diagnosis</code>.</p>"
        )
    rec = diagnosis.get("recommendation") or {}
    parts = [
        f"<p>Source: <code>{_esc(diagnosis.get('_source', ''))}</code> · {_esc(diagnosis.get('n_pairs'))} pairs · "
        f"embedder {_esc(diagnosis.get('embedder'))} · distance {_esc(diagnosis.get('distance'))}</p>",
        f"<p><b>Recommended kernel:</b> {_esc(rec.get('kernel'))} — {_esc(rec.get('kernel_rule'))}<br>"
        f"<b>Recommended divergence:</b> {_esc(rec.get('divergence'))} — {_esc(rec.get('divergence_rule'))}</p>",
    ]
    for family in ("kernel", "divergence"):
        if rec.get(f"{family}_uncertain"):
            parts.append(
                f"<p class='note'><b>{family.capitalize()} uncertain:</b> {_esc(rec.get(f'{family}_verdict'))}</p>"
            )
    metrics = [
        {"group": group, "metric": name, "value": value}
        for group in ("kernel_metrics", "divergence_metrics")
        for name, value in (diagnosis.get(group) or {}).items()
    ]
    parts.append("<h3>Selection metrics</h3>" + _table(pd.DataFrame(metrics)))
    confidence = rec.get("confidence") or {}
    conf_rows = [
        {"family": family, "choice": name, "share of bootstrap resamples": share}
        for family in ("kernel", "divergence")
        for name, share in (confidence.get(family) or {}).items()
    ]
    if conf_rows:
        parts.append("<h3>Bootstrap confidence</h3>" + _table(pd.DataFrame(conf_rows)))
    rows = []
    rules = diagnosis.get("rules") or {}
    for family in ("kernel", "divergence"):
        for rule in rules.get(family, []) if isinstance(rules, dict) else []:
            for cond in rule.get("conditions") or [{}]:
                rows.append(
                    {
                        "family": family,
                        "rule": rule.get("name"),
                        "fired": rule.get("fired"),
                        "metric": ("|" + cond.get("metric", "") + "|") if cond.get("absolute") else cond.get("metric"),
                        "value": cond.get("value"),
                        "test": cond.get("comparison"),
                        "threshold": cond.get("threshold"),
                        "passed": cond.get("passed"),
                    }
                )
    if rows:
        parts.append("<h3>Rules (first match wins)</h3>" + _table(pd.DataFrame(rows)))
    parts.append(_audit_section(diagnosis.get("audit"), fig))
    return "\n".join(parts)


def _config_section(run: RunData) -> str:
    if not run.config:
        return f"<p class='note'>{_esc(run.run_id)}: no config.json yet.</p>"
    flat = pd.json_normalize(run.config, sep=".").T.reset_index()
    flat.columns = ["setting", "value"]
    flat["value"] = flat["value"].map(lambda v: json.dumps(v) if isinstance(v, (list, dict)) else v).astype(str)
    summary = run.summary or {}
    facts = {k: summary.get(k) for k in ("status", "error") if summary.get(k) is not None}
    return (
        f"<h3>{_esc(run.run_id)}</h3>"
        + (_table(pd.DataFrame([facts])) if facts else "")
        + "<details><summary>All settings</summary>"
        + _table(flat)
        + "</details>"
    )


def _summary_section(summary: PlainSummary) -> str:
    return "".join(
        f"<h3>{_esc(title)}</h3><ul>" + "".join(f"<li>{_esc(line)}</li>" for line in lines) + "</ul>"
        for title, lines in summary.sections()
    )


def _cost_section(runs: list[RunData]) -> str:
    """What each run took: wall and training time, throughput and peak memory (summary.json)."""
    rows = [
        {"run": r.run_id, **{k: (r.summary or {}).get(k) for k in COST_COLUMNS}} for r in runs if r.summary is not None
    ]
    if not rows:
        return "<p class='note'>No run has finished yet: cost is written when a run ends.</p>"
    return (
        _table(pd.DataFrame(rows))
        + "<p class='note'>Wall time includes setup, evaluation, checkpoints and HT-SR; tokens/s counts training "
        "tokens over training time; peak memory is the GPU's allocated peak, or the process's resident peak on a "
        "CPU.</p>"
    )


def _health_section(run: RunData) -> str:
    """Every health alert of the run: what it is, from which step, what it means, what to try."""
    alerts = health_of(run)
    label = f"<h3>{_esc(run.run_id)}</h3>"
    if not alerts:
        return label + (
            "<p class='note'>No health alerts: likelihood displacement, memorising, NaN/inf values, "
            "kernel-weight collapse, the ε-DPO β range and HT-SR (layers leaving 2–6 during training, an "
            "over-fit update) were checked.</p>"
        )
    items = "".join(
        f"<div class='alert {_esc(a.severity)}'><b>{_esc(a.headline)}</b> · {_esc(a.evidence)}"
        f"<p class='what'>{_esc(a.meaning)}</p><p><b>What to try:</b> {_esc(a.advice)}</p></div>"
        for a in alerts
    )
    return label + items


RUN_SECTIONS = ("curves", "kernel_weights", "divergences", "clusters", "htsr", "disagreements")
REPORT_DISAGREEMENTS = 20  # rows of the held-out disagreements table in a report (the page lists more)
REPORT_TEXT_CHARS = 300


def _disagreements_section(run: RunData, texts: pd.DataFrame | None) -> str:
    found = policy_candidates(run.run_dir)
    if found is None:
        return "<p class='note'>No evaluation since training began.</p>"
    step, candidates = found
    reliability = policy_reliability()
    head = f"<p>{_esc(POLICY_CANDIDATES_EXPLANATION)}</p>" + (
        f"<p class='note'>{_esc(reliability)}</p>" if reliability else ""
    )
    if candidates.empty:
        return (
            head + f"<p class='note'>At step {step} the policy prefers the chosen response of every held-out pair.</p>"
        )
    table = candidates.head(REPORT_DISAGREEMENTS)
    note = texts_note(run.run_dir, config_value(run.config, "data", "dataset"))
    if note:
        head += f"<p class='note'>{_esc(note)}</p>"
    if texts is not None:
        table = table.join(texts, on="pair_id")
        for column in texts.columns:
            table[column] = table[column].map(
                lambda v: v if not isinstance(v, str) or len(v) <= REPORT_TEXT_CHARS else v[:REPORT_TEXT_CHARS] + "…"
            )
    return (
        head + f"<p>Evaluation at step {step}; the first {len(table)} of {len(candidates)} pairs.</p>" + _table(table)
    )


def _run_sections(run: RunData, fig: _Figures, texts: pd.DataFrame | None) -> dict[str, str]:
    label = f"<h3>{_esc(run.run_id)}</h3>"
    if run.is_empty:
        empty = label + "<p class='note'>This run has not written any results yet.</p>"
        return {key: empty for key in RUN_SECTIONS}
    out = {}
    out["curves"] = (
        label
        + fig(viz.loss_figure(run.metrics, run.eval))
        + fig(viz.reward_accuracy_figure(run.metrics, run.eval))
        + f"<p class='note'>Final held-out reward accuracy: {_esc(viz.accuracy_text(run))}. "
        f"{_esc(viz.TIE_EXPLANATION)}</p>"
        + "".join(
            fig(f)
            for f in (
                viz.reward_margin_figure(run.metrics, run.eval),
                viz.learning_rate_figure(run.metrics),
                viz.throughput_figure(run.metrics),
            )
        )
    )
    kw = viz.kernel_weight_figure(run.metrics)
    beta = viz.beta_figure(run.metrics) if run.epsilon_dpo > 0 else None
    collapse = health.kernel_weight_collapse(run.metrics)
    out["kernel_weights"] = (
        label
        + (fig(kw) if kw else f"<p class='note'>Kernel {_esc(run.kernel_name)} has no mixture weights.</p>")
        + (f"<p class='warn'>{_esc(collapse.title)}: {_esc(collapse.evidence)}</p>" if collapse is not None else "")
        + fig(beta)
    )
    div = viz.divergence_figure(run.eval, run.divergence_name)
    out["divergences"] = label + (fig(div) if div else "<p class='note'>No evaluation yet.</p>")
    separation = viz.separation_table(run)
    clusters = ""
    if run.snapshot_steps:
        try:
            projection, _ = cached_projection(run, ProjectionConfig())
            clusters = fig(viz.cluster_figure(projection, texts, separation=viz.separation_by_step(separation)))
        except ValueError as exc:
            clusters = f"<p class='warn'>Projection unavailable: {_esc(exc)}</p>"
    out["clusters"] = (
        label
        + (clusters or "<p class='note'>No snapshots yet.</p>")
        + fig(viz.dbs_figure(separation))
        + fig(viz.probe_figure(separation))
        + f"<p class='note'>{_esc(viz.SEPARATION_EXPLANATION)}</p>"
        + _table(separation)
    )
    before, after = run.weighted_alpha()
    if run.htsr_before is not None or run.htsr_after is not None or run.htsr_update is not None:
        left = health.htsr_left_range(run.htsr_before, run.htsr_after)
        note = viz_update.base_range_note(run.htsr_before)
        lora = bool(config_value(run.config, "model", "lora"))
        out["htsr"] = (
            label
            + f"<p>{_esc(viz.ALPHA_EXPLANATION)}</p>"
            + fig(viz.htsr_alpha_figure(run.htsr_before, run.htsr_after))
            + fig(viz.weighted_alpha_figure([(run.run_id, before, after)]))
            + (f"<p class='note'>{_esc(viz_update.LORA_WEIGHTED_ALPHA_NOTE)}</p>" if lora else "")
            + f"<h4>Layers that left [2, 6] during training: {len(left)}</h4>"
            + (_table(left) if len(left) else "")
            + (f"<p class='note'>{_esc(note)}</p>" if note else "")
            + _update_section(run, fig)
        )
    else:
        out["htsr"] = (
            label + "<p class='note'>No WeightWatcher analysis in this run (monitoring.htsr off or not finished).</p>"
        )
    out["disagreements"] = label + _disagreements_section(run, texts)
    return out


def _update_section(run: RunData, fig: _Figures) -> str:
    """HT-SR of the update: what training changed per layer (scatter, flagged layers, full table)."""
    head = "<h4>What training changed (HT-SR of the update)</h4>"
    if run.htsr_update is None:
        return head + (
            "<p class='note'>No update table in this run: htsr_update.csv is written at the end of a run with "
            "HT-SR on (runs from before this analysis have none).</p>"
        )
    flagged = viz_update.update_flag_table(run.htsr_update)
    scatter = viz_update.update_figure(run.htsr_update)
    return (
        head
        + f"<p>{_esc(viz_update.UPDATE_EXPLANATION)}</p>"
        + (fig(scatter) if scatter is not None else "<p class='note'>Training changed no layer's weights.</p>")
        + (f"<h4>Layers whose update alpha is flagged: {len(flagged)}</h4>" + _table(flagged) if len(flagged) else "")
        + "<details><summary>Per-layer update table (skipped layers with the reason)</summary>"
        + _table(viz_update.update_display_table(run.htsr_update))
        + "</details>"
    )


def _compare_section(runs: list[RunData], fig: _Figures) -> str:
    grid_fig, _ = viz.kernel_divergence_grid(runs)
    return "".join(
        [
            fig(viz.overlay_figure(runs, "loss", title="Training loss", y_title="loss (nats)")),
            fig(
                viz.overlay_figure(
                    runs, "reward_acc", source="eval", title="Held-out reward accuracy", y_title="accuracy (fraction)"
                )
            ),
            "<h3>Final metrics</h3>",
            _table(viz.final_accuracy_table(runs)),
            "<p class='note'>“ties (step 0)”: evaluated only while policy = reference. "
            f"{_esc(viz.TIE_EXPLANATION)}</p>",
            "<h3>Davies–Bouldin score per snapshot (rows = steps, columns = runs)</h3>",
            _table(viz.separation_comparison_table(runs, "dbs"), index=True),
            "<h3>Linear-probe accuracy per snapshot, 95 % interval (rows = steps, columns = runs)</h3>",
            _table(viz.separation_comparison_table(runs, "probe_acc"), index=True),
            fig(viz.weighted_alpha_figure([(r.run_id, *r.weighted_alpha()) for r in runs])),
            fig(grid_fig),
        ]
    )


def build_report(workspace, run_ids: list[str] | tuple[str, ...], diagnosis: str | dict | None = None) -> str:
    """Self-contained HTML for the given runs (ids or job ids); `diagnosis` = run/job id or its JSON dict.

    Without `diagnosis`, the newest finished diagnosis of the first run's dataset is used if any.
    """
    if not run_ids:
        raise ReportError("name at least one run")
    runs, examples = [], []
    for key in run_ids:
        run_id, run_dir = resolve_run_dir(workspace, key)
        runs.append(load_run(run_dir, run_id))
        if run_dir.parent.name == EXAMPLES_DIR_NAME and run_dir.parent.parent == Path(workspace.root):
            examples.append(run_id)
    if isinstance(diagnosis, (str, int)):
        diagnosis = load_diagnosis_json(workspace, str(diagnosis))
    elif diagnosis is None:
        diagnosis = find_diagnosis(workspace, runs)

    fig = _Figures()
    per_run = []
    for run in runs:
        dataset = ((run.config or {}).get("data") or {}).get("dataset")
        per_run.append(_run_sections(run, fig, run_dataset_texts(workspace, run.run_dir, dataset)))
    built = {
        "summary": _summary_section(plain_summary(runs, diagnosis)),
        "diagnosis": _diagnosis_section(diagnosis, fig),
        "configuration": "".join(_config_section(r) for r in runs),
        "health": "".join(_health_section(r) for r in runs),
        "cost": _cost_section(runs),
    }
    for key in RUN_SECTIONS:
        built[key] = "".join(parts[key] for parts in per_run)
    if len(runs) > 1:
        built["compare"] = _compare_section(runs, fig)
    sections = {key: built[key] for key in SECTION_TITLES if key in built}
    warnings = [f"{r.run_id}: {w}" for r in runs for w in r.warnings]

    title = "DPO-Kernels report: " + ", ".join(
        r.run_id + (f" {EXAMPLE_MARK}" if r.run_id in examples else "") for r in runs
    )
    created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    toc = "".join(f"<a href='#{key}'>{_esc(SECTION_TITLES[key])}</a>" for key in sections)
    body = "".join(
        f"<section id='{key}'><h2>{_esc(SECTION_TITLES[key])}</h2>{content}</section>"
        for key, content in sections.items()
    )
    warn_html = (
        (
            "<div class='warn'><b>Warnings while reading the runs:</b><ul>"
            + "".join(f"<li>{_esc(w)}</li>" for w in warnings)
            + "</ul></div>"
        )
        if warnings
        else ""
    )
    if examples:
        warn_html = (
            f"<div class='warn'><b>Example {'runs' if len(examples) > 1 else 'run'}</b> "
            f"{_esc(', '.join(examples))}: shipped with DPO-Kernels Studio (trained by "
            "scripts/learning_sweep.py on a bundled preference set, named in its configuration), not runs of this "
            "workspace.</div>" + warn_html
        )
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_esc(title)}</title><style>{_CSS}</style>"
        f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>"
        f"<h1>{_esc(title)}</h1><p class='note'>Generated {created} by DPO-Kernels Studio. "
        "Interactive figures: hover for values, drag to zoom, use the slider under the cluster maps.</p>"
        f"<nav class='toc'>{toc}</nav>{warn_html}{body}</body></html>"
    )


def write_report(workspace, run_ids, out: str | Path, diagnosis: str | dict | None = None) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(build_report(workspace, run_ids, diagnosis), encoding="utf-8")
    return out
