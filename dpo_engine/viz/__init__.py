"""Plotly figures for the app and the report (no Streamlit here, so the report can reuse them)."""
