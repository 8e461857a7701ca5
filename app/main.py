"""DPO-Kernels Studio: the Streamlit entry point (navigation only; each page lives in pages/)."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

PAGES_DIR = Path(__file__).resolve().parent.parent / "pages"

st.set_page_config(page_title="DPO-Kernels Studio", page_icon="🧭", layout="wide")


def _page(file: str, title: str, icon: str, default: bool = False):
    return st.Page(str(PAGES_DIR / file), title=title, icon=icon, default=default,
                   url_path=file.removesuffix(".py"))


navigation = st.navigation(
    {
        "Data": [
            _page("home.py", "Overview", "🏠", default=True),
            _page("datasets.py", "Datasets", "📂"),
            _page("diagnose.py", "Diagnose", "🔬"),
        ],
        "Training": [
            _page("train.py", "Train", "🚀"),
            _page("runs.py", "Runs", "📈"),
            _page("compare.py", "Compare", "⚖️"),
        ],
        "Analysis": [
            _page("htsr.py", "HT-SR", "📐"),
            _page("jobs.py", "Jobs", "🗂️"),
        ],
    }
)
st.sidebar.caption("DPO-Kernels Studio · kernelized DPO with diagnosis and interpretability")
navigation.run()
