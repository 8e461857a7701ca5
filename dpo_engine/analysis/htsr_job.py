"""The "htsr" job: WeightWatcher analysis of any model the machine has, written into the run directory."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dpo_engine import rundir
from dpo_engine.analysis.htsr import analyze_model, summarize


def analyze_into(
    model_name: str,
    run_dir: Path,
    *,
    workspace,
    trust_remote_code: bool = False,
    progress=None,
    device: str | None = None,
) -> dict[str, Any]:
    """Load `model_name` (registry name, local dir, cached id, or a run's LoRA model/ dir), analyse, write files.

    The weights are loaded on the host; with a CUDA `device` the layers' Gram spectra are computed there
    (an 8B model's float64 spectra take a CPU a long time)."""
    from dpo_engine.models import load_policy

    progress = progress or (lambda f, m: None)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    progress(0.05, f"loading {model_name}")
    model = _load_for_analysis(
        model_name, workspace=workspace, trust_remote_code=trust_remote_code, load_policy=load_policy
    )
    progress(0.2, "analysing layer spectra")
    table = analyze_model(model, device=device if device and device.startswith("cuda") else None)
    table.to_csv(run_dir / "htsr.csv", index=False)
    summary = {
        "status": "succeeded",
        "model": model_name,
        **summarize(table),
        "wall_time_s": time.perf_counter() - t0,
        "error": None,
    }
    rundir.write_json(run_dir / rundir.SUMMARY, summary)
    progress(1.0, f"weighted alpha {summary['weighted_alpha']:.3f}")
    return summary


def _load_for_analysis(name: str, *, workspace, trust_remote_code: bool, load_policy):
    path = Path(name).expanduser()
    if path.is_dir() and (path / "adapter_config.json").is_file():  # a LoRA run: merge adapters into the base
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=trust_remote_code
        )
        return model.merge_and_unload()
    model, _ = load_policy(
        name, workspace=workspace, dtype="float32", device="cpu", trust_remote_code=trust_remote_code
    )
    return model


def run_htsr_job(ctx) -> dict[str, Any]:
    params = ctx.params
    if not params.get("model"):
        raise ValueError("htsr job needs params.model (a model name, local directory, or a run's model/ directory)")
    return analyze_into(
        str(params["model"]),
        ctx.run_dir,
        workspace=ctx.workspace,
        trust_remote_code=bool(params.get("trust_remote_code", False)),
        progress=ctx.progress,
        device=ctx.device,
    )
