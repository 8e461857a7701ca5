"""Small widgets every page uses: headers, job status panels, figure export."""

from __future__ import annotations

import streamlit as st

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


def figure_with_export(fig, *, key: str) -> None:
    """Show a plotly figure; offer it as a PNG (when the static renderer works) and as HTML."""
    st.plotly_chart(fig, width="stretch", key=f"chart-{key}")
    cols = st.columns(2)
    html = fig.to_html(include_plotlyjs=True, full_html=True)
    cols[1].download_button("Figure as HTML", html, file_name=f"{key}.html", mime="text/html", key=f"html-{key}")
    try:
        png = _figure_png(fig.to_json())
    except Exception:  # static export needs a headless Chromium; HTML export always works
        png = None
    if png:
        cols[0].download_button("Figure as PNG", png, file_name=f"{key}.png", mime="image/png", key=f"png-{key}")


@st.cache_data(show_spinner=False, max_entries=64)
def _figure_png(fig_json: str) -> bytes:
    import plotly.io as pio

    return pio.to_image(pio.from_json(fig_json), format="png", scale=2)


PAGES_DIR = __import__("pathlib").Path(__file__).resolve().parent.parent / "pages"


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
