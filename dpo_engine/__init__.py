"""DPO-Kernels Studio engine: data, diagnosis, kernelized DPO training, analysis, jobs.

Nothing in this package imports Streamlit; the web app and the CLI are thin shells over it.
"""

__version__ = "0.1.0"
