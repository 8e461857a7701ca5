"""The "diagnose" job: load a dataset, embed it (cached), diagnose it, write the run directory.

`run_diagnosis` does the work with plain callbacks, so the worker's executor (`run_diagnose_job`)
and the CLI's in-process ``--foreground`` path share one implementation. Run directory outputs:
``diagnosis.json`` (the `Diagnosis.to_json_dict` contract plus a ``dataset`` entry),
``diagnosis_pairs.npz`` (per-pair arrays, bootstrap table), ``embeddings.npz`` (float32
prompt, chosen, rejected in dataset order) and ``audit_flagged.parquet`` (the data audit's flagged
pairs with their texts, label-noise candidates among them; the audit's numbers are
``diagnosis.json["audit"]``, per category or source under ``["audit"]["by_group"]`` when the data has one).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dpo_engine.analysis.audit import AUDIT_FLAGGED, SplitSettings, audit_data
from dpo_engine.analysis.audit.label_noise import embedding_signal
from dpo_engine.analysis.audit.thresholds import LABEL_NOISE_MAX_PAIRS
from dpo_engine.data import LoadedDataset, open_dataset
from dpo_engine.data.split import SplitBy
from dpo_engine.embed import DEFAULT_EMBEDDER, PairEmbeddings, embed_pairs
from dpo_engine.embed.encoder import DEFAULT_BACKEND, Backend, Precision, resolve_precision
from dpo_engine.embed.pairs import canonical_embedder_name
from dpo_engine.selection.diagnosis import DIAGNOSIS_JSON, Diagnosis, diagnose
from dpo_engine.selection.groups import group_breakdown
from dpo_engine.selection.metrics import Distance
from dpo_engine.selection.rules import Thresholds
from dpo_engine.workspace import Workspace

EMBEDDINGS_NPZ = "embeddings.npz"
ProgressFn = Callable[[float, str], None]


class DiagnoseParams(BaseModel):
    """Parameters of a diagnose job (every default written out)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(..., description="stored dataset id or name, or a path to a preference file")
    embedder: str = DEFAULT_EMBEDDER
    distance: Distance = "cosine"
    max_pairs: int | None = Field(None, ge=2, description="use only the first N pairs (file order)")
    thresholds: dict[str, float] = Field(default_factory=dict, description="overrides of Thresholds defaults")
    n_bootstrap: int = Field(200, ge=0)
    seed: int = 0
    batch_size: int | None = Field(None, ge=1, description="texts per batch; None = the backend's default")
    max_seq_length: int | None = Field(None, ge=1)
    precision: Precision = Field("auto", description="auto: bfloat16 on CPUs with native bf16, else float32")
    backend: Backend = Field(DEFAULT_BACKEND, description="encoder runtime: torch, onnx or onnx-int8 (CPU)")
    preflight_model: str | None = Field(
        "smollm2-135m-instruct", description="model whose tokenizer the token pre-flight uses; None skips it"
    )
    max_length: int = Field(256, ge=8, description="training max_length the pre-flight checks (TrainConfig default)")
    max_prompt_length: int | None = Field(
        None, ge=4, description="training max_prompt_length; None = half of max_length"
    )
    audit: bool = Field(True, description="data audit: length bias, duplicates and conflicts, split leakage")
    split_by: SplitBy = Field(
        "prompt", description="training data.split_by the leakage check uses (TrainConfig default)"
    )
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="training data.eval_fraction (TrainConfig default)")
    min_eval_pairs: int = Field(32, ge=1, description="training data.min_eval_pairs (TrainConfig default)")
    split_seed: int = Field(0, description="training split seed (data.split_seed, else optimisation.seed; default 0)")
    label_noise: bool = Field(
        True, description="label-noise candidates in the audit (the embedding margin, free once pairs are embedded)"
    )
    label_noise_logprob: bool = Field(
        False,
        description="also the log-prob gap of preflight_model (the model chosen for training) on a seeded sample of "
        "at most LABEL_NOISE_MAX_PAIRS pairs: a forward pass of that model, off by default since on the bundled "
        "models it found flipped labels no better than random (METHOD.md 1.6)",
    )

    @field_validator("thresholds")
    @classmethod
    def _known_thresholds(cls, value: dict[str, float]) -> dict[str, float]:
        Thresholds.from_assignments(value)  # raises a one-line error for unknown names or bad values
        return value

    @model_validator(mode="after")
    def _prompt_fits(self) -> DiagnoseParams:
        if self.preflight_model is not None and self.max_prompt_length is not None:
            if self.max_prompt_length >= self.max_length:
                raise ValueError(
                    f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length ({self.max_length})"
                )
        return self

    def split_settings(self) -> SplitSettings:
        return SplitSettings(
            split_by=self.split_by,
            eval_fraction=self.eval_fraction,
            min_eval_pairs=self.min_eval_pairs,
            seed=self.split_seed,
        )

    def resolved_thresholds(self) -> Thresholds:
        return Thresholds.from_assignments(self.thresholds)


def run_diagnosis(
    params: DiagnoseParams,
    workspace: Workspace,
    run_dir: str | Path | None,
    device: str = "cpu",
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    loaded: LoadedDataset | None = None,
    flagged: Callable[[pd.DataFrame], None] | None = None,
) -> tuple[Diagnosis, PairEmbeddings, LoadedDataset, dict[str, Any]]:
    """Embed, diagnose and audit; write the run directory when ``run_dir`` is given. Returns the summary too.

    The audit's flagged pairs (with their texts) go to ``run_dir/audit_flagged.parquet`` and to ``flagged``."""
    report = progress or (lambda fraction, message: None)
    started = time.perf_counter()
    thresholds = params.resolved_thresholds()
    report(0.0, f"loading {params.dataset}")
    loaded = loaded or open_dataset(workspace, params.dataset)
    table = loaded.table
    if params.max_pairs is not None:
        table = table.head(params.max_pairs).reset_index(drop=True)
    if len(table) < 2:
        raise ValueError(f"diagnosis needs at least 2 pairs; {loaded.label} has {len(table)}")
    preflight = n_tokens = None
    if params.preflight_model:
        from dpo_engine.data.preflight import load_tokenizer, token_counts, token_preflight

        report(0.01, f"token pre-flight with the {params.preflight_model} tokenizer")
        tokenizer = load_tokenizer(params.preflight_model, workspace)
        n_tokens = token_counts(table, tokenizer)
        preflight = token_preflight(
            table,
            tokenizer,
            model=params.preflight_model,
            max_length=params.max_length,
            max_prompt_length=params.max_prompt_length,
            n_tokens=n_tokens,
        )

    def embedded(done: int, total: int) -> None:
        report(0.02 + 0.9 * done / max(total, 1), f"embedded {done}/{total} texts")

    backend = params.backend if device == "cpu" else "torch"  # the ONNX backends are CPU runtimes

    embeddings = embed_pairs(
        table,
        embedder=params.embedder,
        device=device,
        batch_size=params.batch_size,
        max_seq_length=params.max_seq_length,
        progress=embedded,
        cache_dir=workspace.embeddings_dir,
        should_stop=should_stop,
        precision=params.precision,
        backend=backend,
    )
    report(0.93, f"computing metrics and {params.n_bootstrap} bootstrap resamples")
    diagnosis = diagnose(
        embeddings.prompt,
        embeddings.chosen,
        embeddings.rejected,
        distance=params.distance,
        thresholds=thresholds,
        n_bootstrap=params.n_bootstrap,
        seed=params.seed,
        embedder=canonical_embedder_name(params.embedder),
    )
    audit = flagged_rows = signals = by_group = None
    if params.audit and params.label_noise:
        signals = {"embedding": embedding_signal(diagnosis.pairs.margins)}
        if params.preflight_model and params.label_noise_logprob:
            signals["logprob"] = _logprob_signal(table, params, workspace, device, report, should_stop)
    if params.audit:
        report(0.97, "auditing the data: length bias, duplicates, leakage")
        audit = audit_data(
            table,
            prompt_emb=embeddings.prompt,
            chosen_emb=embeddings.chosen,
            rejected_emb=embeddings.rejected,
            token_counts=n_tokens,
            split=params.split_settings(),
            label_noise_signals=signals,
            label_noise_model=params.preflight_model if signals and "logprob" in signals else None,
        )
        flagged_rows = audit.flagged_with_texts(table)
        by_group = group_breakdown(table, diagnosis.pairs.quantities(), audit, n_tokens)
    dataset_entry = {
        "label": loaded.label,
        "source": loaded.source,
        "dataset_id": loaded.dataset_id,
        "dropped_at_ingest": loaded.dropped,
        "max_pairs": params.max_pairs,
        "embedding_precision": "float32/int8" if backend != "torch" else resolve_precision(params.precision, device),
        "embedding_backend": backend,
    }
    summary = {
        "n_pairs": diagnosis.n_pairs,
        "kernel": diagnosis.recommendation.kernel,
        "divergence": diagnosis.recommendation.divergence,
        "kernel_confidence": diagnosis.recommendation.confidence.kernel[diagnosis.recommendation.kernel],
        "divergence_confidence": diagnosis.recommendation.confidence.divergence[diagnosis.recommendation.divergence],
        "wall_s": round(time.perf_counter() - started, 3),
        "dataset": dataset_entry,
        "token_preflight": preflight.model_dump() if preflight is not None else None,
        "audit": audit.to_json_dict() if audit is not None else None,
    }
    if by_group is not None:
        summary["audit"]["by_group"] = by_group
    if run_dir is not None:
        run_dir = Path(run_dir)
        diagnosis.save(run_dir)
        json_path = run_dir / DIAGNOSIS_JSON
        data = json.loads(json_path.read_text())
        data["dataset"] = dataset_entry
        data["token_preflight"] = summary["token_preflight"]
        data["audit"] = summary["audit"]
        json_path.write_text(json.dumps(data, indent=2))
        if flagged_rows is not None:
            flagged_rows.to_parquet(run_dir / AUDIT_FLAGGED, index=False)
        embeddings.save_npz(run_dir / EMBEDDINGS_NPZ)
        if "pair_id" in table.columns:
            table[["pair_id"]].to_parquet(run_dir / "diagnosis_pair_ids.parquet", index=False)
        summary["diagnosis_json"] = str(json_path)
    if flagged_rows is not None and flagged is not None:
        flagged(flagged_rows)
    report(1.0, f"recommended {summary['kernel']} + {summary['divergence']}")
    return diagnosis, embeddings, loaded, summary


def _logprob_signal(table, params: DiagnoseParams, workspace, device, report, should_stop) -> np.ndarray:
    """The reference model's log-prob gap on every pair, or on a seeded sample of LABEL_NOISE_MAX_PAIRS
    (NaN elsewhere): a forward pass per pair is the audit's one cost that grows with the model."""
    from dpo_engine.analysis.audit.logprob_gap import logprob_gap
    from dpo_engine.models.loading import load_policy

    n = len(table)
    rows = np.arange(n)
    if n > LABEL_NOISE_MAX_PAIRS:
        rows = np.sort(np.random.default_rng(params.seed).choice(n, size=LABEL_NOISE_MAX_PAIRS, replace=False))
    report(0.94, f"label noise: {params.preflight_model} log-probs of {len(rows)} pairs")
    model, tokenizer = load_policy(params.preflight_model, workspace=workspace, device=device)

    def scored(done: int, total: int) -> None:
        if should_stop is not None and should_stop():
            raise InterruptedError("stopped while scoring label noise")
        report(0.94 + 0.03 * done / max(total, 1), f"label noise: log-probs of {done}/{total} pairs")

    out = np.full(n, np.nan)
    out[rows] = logprob_gap(
        table.iloc[rows],
        model,
        tokenizer,
        max_length=params.max_length,
        max_prompt_length=params.max_prompt_length or max(4, params.max_length // 2),  # TrainConfig default
        progress=scored,
    )
    return out


def _stop_as_cancel(exc: InterruptedError) -> BaseException:
    from dpo_engine.jobs.context import JobCancelled

    return JobCancelled(str(exc))


def run_diagnose_job(ctx) -> dict:
    """Executor of the "diagnose" job kind."""
    params = DiagnoseParams(**ctx.params)
    try:
        _, _, _, summary = run_diagnosis(
            params,
            ctx.workspace,
            ctx.run_dir,
            device=ctx.device,
            progress=ctx.progress,
            should_stop=ctx.should_stop,
        )
    except InterruptedError as exc:
        raise _stop_as_cancel(exc) from exc
    return summary
