"""Presenting runs: reading run directories for display and building the self-contained HTML report."""

from dpo_engine.report.builder import ReportError, build_report, resolve_run_dir, write_report
from dpo_engine.report.rundata import RunData, load_run

__all__ = ["ReportError", "RunData", "build_report", "load_run", "resolve_run_dir", "write_report"]
