"""DPO-Kernels Studio: the Streamlit entry point (navigation only; each page lives in pages/)."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

PAGES_DIR = Path(__file__).resolve().parent.parent / "pages"

st.set_page_config(page_title="DPO-Kernels Studio", page_icon=":material/hub:", layout="wide")


def _page(file: str, title: str, icon: str, default: bool = False):
    return st.Page(str(PAGES_DIR / file), title=title, icon=icon, default=default, url_path=file.removesuffix(".py"))


navigation = st.navigation(
    {
        "Data": [
            _page("home.py", "Overview", ":material/home:", default=True),
            _page("datasets.py", "Datasets", ":material/folder_open:"),
            _page("diagnose.py", "Diagnose", ":material/biotech:"),
        ],
        "Training": [
            _page("train.py", "Train", ":material/rocket_launch:"),
            _page("runs.py", "Runs", ":material/monitoring:"),
            _page("compare.py", "Compare", ":material/compare_arrows:"),
        ],
        "Analysis": [
            _page("htsr.py", "HT-SR", ":material/analytics:"),
            _page("jobs.py", "Jobs", ":material/list_alt:"),
        ],
    }
)
st.sidebar.caption("DPO-Kernels Studio · kernelized DPO with diagnosis and interpretability")
navigation.run()
