"""Streamlit UI building blocks for DPO-Kernels Studio (navigation, shared state, widgets)."""
