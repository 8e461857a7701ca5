"""Small widgets every page uses: headers, job status panels, figure export."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from dpo_engine.viz.export import figure_html, figure_png

STATUS_ICONS = {
    "queued": "⏳",
    "running": "🔄",
    "succeeded": "✅",
    "failed": "❌",
    "cancelled": "⛔",
}


def page_header(title: str, caption: str) -> None:
    st.title(title)
    st.caption(caption)


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else (f"{m}m {s:02d}s" if m else f"{s}s")


def job_status_panel(job, *, show_cancel: bool = True, key: str = "") -> None:
    """Status, progress bar, elapsed time and a cancel button for one job snapshot."""
    icon = STATUS_ICONS.get(job.status, "•")
    cols = st.columns([3, 2, 2])
    cols[0].markdown(f"**{icon} {job.kind} #{job.id}** · {job.title or job.run_id}")
    cols[1].markdown(f"status: `{job.status}`" + (" (cancel requested)" if job.cancel_requested else ""))
    cols[2].markdown(f"elapsed: {format_seconds(job.elapsed_s)}")
    st.progress(min(max(float(job.progress or 0.0), 0.0), 1.0), text=job.message or job.status)
    if job.error:
        st.error(job.error)
    if show_cancel and job.status in ("queued", "running") and not job.cancel_requested:
        if st.button("Cancel job", key=f"cancel-{key}-{job.id}"):
            from app.state import job_store

            job_store().request_cancel(job.id)
            st.rerun()


ALERT_BOXES = {"error": st.error, "warning": st.warning, "info": st.info}


def health_alerts(alerts, *, healthy_note: bool = True) -> None:
    """Run-health alerts (dpo_engine.analysis.health): what, from which step, what it means, what to try."""
    if not alerts:
        if healthy_note:
            st.caption(
                "✅ Run health: no alerts (likelihood displacement, memorising, NaN/inf, kernel-weight "
                "collapse, ε-DPO β range and HT-SR layers leaving 2–6 during training are checked as the run goes)."
            )
        return
    for alert in alerts:
        box = ALERT_BOXES.get(alert.severity, st.warning)
        box(f"**{alert.headline}** · {alert.evidence}\n\n{alert.meaning}\n\n**What to try:** {alert.advice}", icon="🩺")


def figure_with_export(fig, *, key: str) -> None:
    """Show a plotly figure with HTML and PNG downloads; both are built only when clicked."""
    # theme=None: the figure keeps dpo_engine.viz.style's look, identical to the report and the PNG
    st.plotly_chart(fig, width="stretch", key=f"chart-{key}", theme=None)
    cols = st.columns(2)
    fig_json = fig.to_json()
    cols[0].download_button(
        "Figure as PNG",
        lambda: _figure_png(fig_json),
        file_name=f"{key}.png",
        mime="image/png",
        key=f"png-{key}",
        help="Slide-sized static image (16:9, 2560 × 1440, rendered with headless Chromium).",
    )
    cols[1].download_button(
        "Figure as HTML",
        lambda: _figure_html(fig_json),
        file_name=f"{key}.html",
        mime="text/html",
        key=f"html-{key}",
        help="Interactive, self-contained file.",
    )


def _figure_html(fig_json: str) -> str:
    return figure_html(fig_json)


@st.cache_data(show_spinner=False, max_entries=64)
def _figure_png(fig_json: str) -> bytes:
    return figure_png(fig_json)


PAGES_DIR = Path(__file__).resolve().parent.parent / "pages"


def page_link(file: str, label: str, icon: str | None = None) -> None:
    """Link to another page of the app; plain text when the page runs outside the navigation (tests)."""
    try:
        st.page_link(str(PAGES_DIR / file), label=label, icon=icon)
    except Exception:  # StreamlitPageNotFoundError when no st.navigation is active
        st.markdown(f"{icon or ''} {label}")


def switch_page(file: str) -> None:
    """Open another page; a no-op outside the navigation (tests run pages standalone)."""
    try:
        st.switch_page(str(PAGES_DIR / file))
    except Exception as exc:  # noqa: BLE001 - only StreamlitAPIException subclasses reach here
        if type(exc).__name__ in ("RerunException", "StopException"):
            raise
