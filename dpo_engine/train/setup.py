"""Everything before the first training step, built into one `TrainingParts`: device, models, data, method, optimiser.

Read top to bottom in the order `build_parts` calls them: the accelerator picks the device and
precision, the policy is loaded (with LoRA adapters, or beside a frozen reference copy), the pairs are
tokenised and split, the kernel is calibrated on reference representations, and the optimiser gets
one parameter group for the model and one for the kernel's mixture weights. Each stage returns what
it built; nothing is set on the trainer.
"""

from __future__ import annotations

import copy
import datetime
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from transformers import get_scheduler

from dpo_engine import rundir
from dpo_engine.data.split import split_pairs
from dpo_engine.data.token_arrays import ArrayPairs, TokenArrays
from dpo_engine.data.token_cache import cached_token_arrays
from dpo_engine.data.tokenize import TokenizedPair, pair_length, response_end
from dpo_engine.embed import embed_texts
from dpo_engine.kernels import KernelCalibration, KernelModule, build_kernel, random_orthogonal_projection
from dpo_engine.logit_transform import logit_transform
from dpo_engine.models import load_policy, resolve_dtype
from dpo_engine.train.config import GRADIENT_CHECKPOINTING_MIN_PARAMS, TrainConfig
from dpo_engine.train.data import check_pairs, eval_subset, load_dataset
from dpo_engine.train.monitoring import HTSR_IN_RUN, TimeSplit, htsr_before, htsr_plan
from dpo_engine.train.parts import EncoderReps, TrainingParts
from dpo_engine.train.passes import ModelPasses, check_logits_match_the_model
from dpo_engine.train.reference import ReferenceCache, model_key
from dpo_engine.workspace import Workspace

CALIBRATED_KERNELS = ("spectral", "mahalanobis", "mixture", "hmk")
# How long a process waits at a collective for the others (torch's NCCL default is ten minutes).
PROCESS_GROUP_TIMEOUT_S = 60 * 60

LogFn = Callable[[str], None]


def build_parts(
    config: TrainConfig,
    run_dir: Path,
    workspace: Workspace,
    accelerator: Accelerator,
    compute_dtype: torch.dtype,
    *,
    pairs: pd.DataFrame | None,
    timer: TimeSplit,
    log: LogFn,
) -> TrainingParts:
    """Everything after the device (`make_accelerator`) and before the first step: model(s), data
    split, calibration, kernel, optimiser."""
    resuming = rundir.latest_checkpoint(run_dir) is not None
    if accelerator.is_main_process:
        rundir.write_json(run_dir / rundir.CONFIG, config.resolved())
        record_data_file(config, run_dir, pairs, resuming, log)
    torch.manual_seed(config.optimisation.seed)
    with accelerator.main_process_first():  # rank 0 fills the workspace's model and data caches first
        with timer.timed("load_model"):
            models = load_models(config, workspace, run_dir, accelerator, compute_dtype, resuming, timer, log)
        with timer.timed("load_data"):
            split = load_data(config, workspace, pairs, models.tokenizer, accelerator, timer, log)
    check_token_ids(split.train_pairs.arrays, models.model)
    if not config.model.load_in_4bit:  # 4-bit weights were placed on the device as they loaded
        models.model.to(accelerator.device)
    if models.ref_model is not None:
        models.ref_model.to(accelerator.device)
    if len(split.train_pairs):
        check_logits_match_the_model(models.model, accelerator, split.train_pairs[0])
    pack_pairs = config.optimisation.pack_pairs and packing_keeps_attention(models.model, config.data.max_length, log)
    with timer.timed("calibration"):
        method = setup_method(config, run_dir, accelerator, models, split, pack_pairs, log)
    kernel_params = method.kernel.mixture_parameters() if method.kernel is not None else []
    model, optimizer, scheduler = build_optimiser(config, accelerator, models.model, kernel_params, split.total_steps)
    return TrainingParts(
        accelerator=accelerator,
        device=accelerator.device,
        compute_dtype=compute_dtype,
        tokenizer=models.tokenizer,
        model=model,
        ref_model=models.ref_model,
        hidden_size=models.hidden_size,
        reference_cache=models.reference_cache,
        htsr_before=models.htsr_before,
        base_model_key=models.base_model_key,
        htsr_plan=models.htsr_plan,
        pairs=split.pairs,
        train_pairs=split.train_pairs,
        eval_pairs=split.eval_pairs,
        probe_pairs=split.probe_pairs,
        batches_per_epoch=split.batches_per_epoch,
        total_steps=split.total_steps,
        pack_pairs=pack_pairs,
        encoder_reps=method.encoder_reps,
        projection=method.projection,
        calibration=method.calibration,
        kernel=method.kernel,
        kernel_params=kernel_params,
        optimizer=optimizer,
        scheduler=scheduler,
    )


def check_token_ids(arrays: TokenArrays, model: torch.nn.Module) -> None:
    """Every token id must index the LM head. Checked once here, on the arrays, because the passes do
    not read labels back from a GPU (losses.check_labels)."""
    head = model.get_output_embeddings()
    if head is None:  # no separate head: passes.lm_head_weight refuses the model in one line
        return
    vocab = head.weight.shape[0]
    sides = (arrays.prompt, arrays.chosen, arrays.rejected)
    top = max((int(side.values.max()) for side in sides if len(side.values)), default=-1)
    if top >= vocab:
        raise ValueError(
            f"the tokenizer gives token id {top} but the model's LM head has {vocab} rows: "
            "the tokenizer does not belong to this model"
        )


# ------------------------------------------------------------------ device
def make_accelerator(config: TrainConfig, request: str | None) -> tuple[Accelerator, torch.dtype]:
    """The accelerator for the requested device and the compute dtype the config resolves to there."""
    cpu = request is not None and str(request).startswith("cpu")
    if request and str(request).startswith("cuda:") and torch.cuda.is_available():
        torch.cuda.set_device(torch.device(request))
    dtype = resolve_dtype(config.model.dtype, "cpu" if cpu or not torch.cuda.is_available() else "cuda")
    mixed = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
    # ranks wait at barriers while rank 0 loads and hashes the model and tokenises the data first
    # (`main_process_first`): NCCL's default ten minutes is too short for an 8B model on slow storage
    group = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=PROCESS_GROUP_TIMEOUT_S))
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed, kwargs_handlers=[group])
    allow_tf32(accelerator.device)
    return accelerator, dtype


def allow_tf32(device: torch.device) -> None:
    """fp32 matrix products on tensor cores (TF32) on Ampere and later GPUs: the kernels and fp32 runs
    take the tensor cores, with the 10-bit mantissa that bf16 training already accepts (under autocast
    the LM head's products are in the compute dtype anyway: METHOD.md 2.1)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# ------------------------------------------------------------------ models
@dataclass
class LoadedModels:
    tokenizer: Any
    model: torch.nn.Module  # the policy, not yet prepared by the accelerator
    ref_model: torch.nn.Module | None
    hidden_size: int
    reference_cache: ReferenceCache | None
    htsr_before: float | None
    base_model_key: str  # the untrained weights' hash (reference cache, HT-SR "before" cache)
    htsr_plan: str  # monitoring.htsr resolved for this model and process count (monitoring.htsr_plan)


def load_models(
    config: TrainConfig,
    workspace: Workspace,
    run_dir: Path,
    accelerator: Accelerator,
    compute_dtype: torch.dtype,
    resuming: bool,
    timer: TimeSplit,
    log: LogFn,
) -> LoadedModels:
    """The policy (LoRA adapters attached, or beside a frozen reference copy), its tokenizer, the
    reference cache for these weights, and the HT-SR of the untrained model."""
    mcfg = config.model
    model, tokenizer = load_policy(
        mcfg.name,
        workspace=workspace,
        dtype=weight_dtype(compute_dtype, lora=mcfg.lora),
        device=accelerator.device,
        trust_remote_code=mcfg.trust_remote_code,
        quantization_config=four_bit_config(compute_dtype, accelerator.device) if mcfg.load_in_4bit else None,
        attn_implementation=requested_attention(mcfg.attn_implementation, accelerator.device),
    )
    hidden_size = int(model.config.hidden_size)
    # Keyed on the weights before any adapter is attached: the reference model, and the "before" model.
    key = model_key(model, compute_dtype, accelerator.device, logit_transform(model.config))
    plan, why = htsr_plan(
        config.monitoring.htsr, parameter_count(model), accelerator.num_processes, four_bit=mcfg.load_in_4bit
    )
    if why:
        log(why)
    before = None
    if plan == HTSR_IN_RUN and not resuming:
        before = htsr_before(
            model, key, workspace=workspace, run_dir=run_dir, accelerator=accelerator, timer=timer, log=log
        )
    reference_cache = None
    if config.optimisation.reference_cache:
        reference_cache = ReferenceCache(workspace.root, key)
        log(f"reference cache: {reference_cache.count()} pair(s) known for this model")
    if mcfg.lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(config.optimisation.seed)
        lcfg = LoraConfig(
            r=mcfg.lora_r,
            lora_alpha=mcfg.lora_alpha,
            lora_dropout=mcfg.lora_dropout,
            target_modules=list(mcfg.lora_target_modules),
            task_type="CAUSAL_LM",
        )
        if mcfg.load_in_4bit:  # norms in fp32, input gradients for checkpointing: peft's QLoRA preparation
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        try:
            # the adapters train in fp32 whatever the frozen base is stored in (peft's autocast_adapter_dtype)
            model = get_peft_model(model, lcfg, autocast_adapter_dtype=True)
        except ValueError as exc:
            raise ValueError(
                f"LoRA could not attach to model {mcfg.name!r}: {exc} "
                "(set model.lora_target_modules to module names this model has)"
            ) from exc
        ref_model = None
    else:
        # a copy in the policy's own dtype: one in the compute dtype would round its embeddings, norms and
        # residual stream, which autocast keeps in fp32 for the policy, and differ from it before any update
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    if use_gradient_checkpointing(mcfg.gradient_checkpointing, parameter_count(model)):
        log("gradient checkpointing: on")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if mcfg.lora:
            model.enable_input_require_grads()
    model.config.use_cache = False
    return LoadedModels(tokenizer, model, ref_model, hidden_size, reference_cache, before, key, plan)


def require_4bit_support(device: str | torch.device) -> None:
    """Refuse model.load_in_4bit where bitsandbytes' 4-bit kernels cannot run, saying what to do."""
    if torch.device(device).type != "cuda":
        raise ValueError(
            f"model.load_in_4bit (QLoRA) needs an NVIDIA GPU and this run is on {device}: "
            "turn it off, or run on a GPU worker"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ValueError(
            "model.load_in_4bit (QLoRA) needs bitsandbytes: pip install 'dpo-kernels-studio[qlora]'"
        ) from exc


def requested_attention(attn_implementation: str, device: str | torch.device) -> str | None:
    """What to ask transformers for: nothing for sdpa (its default, eager for the few models without
    SDPA); flex_attention only on an NVIDIA GPU, where PyTorch can run its backward pass."""
    if attn_implementation == "flex_attention" and torch.device(device).type != "cuda":
        raise ValueError(
            f"model.attn_implementation flex_attention trains only on NVIDIA GPUs and this run is on {device} "
            "(PyTorch has no flex_attention backward pass elsewhere): use sdpa"
        )
    return None if attn_implementation == "sdpa" else attn_implementation


def require_device_support(model_config, device: str | torch.device) -> None:
    """Refuse, in one line, model options that cannot run on `device` at all."""
    if model_config.load_in_4bit:
        require_4bit_support(device)
    requested_attention(model_config.attn_implementation, device)


def four_bit_config(compute_dtype: torch.dtype, device: str | torch.device):
    """NF4 with double quantisation, computing in the run's dtype (the QLoRA recipe)."""
    require_4bit_support(device)
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def weight_dtype(compute_dtype: torch.dtype, *, lora: bool) -> torch.dtype:
    """The dtype the policy's weights are stored in.

    With LoRA the base weights are frozen and autocast would cast them to the compute dtype on every
    pass anyway, so they are loaded in it directly (half the memory of fp32, and no fp32 copy on the
    way); the adapters stay fp32. A full fine-tune keeps fp32 master weights for the optimiser."""
    return compute_dtype if lora else torch.float32


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters of the model (LoRA adapters included, which are a rounding error beside the base).
    bitsandbytes packs two 4-bit weights per stored element (Params4bit), so those count twice."""
    return sum(p.numel() * (2 if type(p).__name__ == "Params4bit" else 1) for p in model.parameters())


def use_gradient_checkpointing(setting: str, n_params: int) -> bool:
    """model.gradient_checkpointing resolved: on, off, or auto (on from GRADIENT_CHECKPOINTING_MIN_PARAMS)."""
    if setting == "auto":
        return n_params >= GRADIENT_CHECKPOINTING_MIN_PARAMS
    return setting == "on"


def packing_keeps_attention(model: torch.nn.Module, max_length: int, log: LogFn) -> bool:
    """Whether packed rows give every token the attention it has alone. Their block mask replaces the
    model's own, so a sliding window shorter than a sequence would be lost: such models use the plain layout."""
    config = getattr(model, "config", None)
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False or int(window) >= max_length:
        return True
    log(
        f"the model attends within a sliding window of {window} tokens, shorter than data.max_length "
        f"{max_length}: pairs are not packed (the packed block mask would drop the window)"
    )
    return False


# ------------------------------------------------------------------ data
SMALL_SHARE_OF_TRAINING = 0.05  # a run of max_steps that sees less of the training split says so in its log


def truncation_note(arrays: TokenArrays, end: list[int], max_length: int, max_prompt_length: int) -> str | None:
    """What the sequence limits cut, in the run's log: pairs whose chosen or rejected response lost its end
    to `max_length` (it no longer ends its turn), and prompts at `max_prompt_length` (cut from the start,
    or exactly that long); None when nothing was."""
    responses = int(arrays.cut_responses(end).sum()) if end else 0
    prompts = int((arrays.prompt.lengths() >= max_prompt_length).sum())
    if not (responses or prompts):
        return None
    n = len(arrays)
    return (
        f"truncation: {responses} of {n} pairs ({responses / n:.0%}) have a response cut by data.max_length "
        f"{max_length}; {prompts} prompts ({prompts / n:.0%}) reach data.max_prompt_length {max_prompt_length} "
        "(cut from the start, or exactly that long). The diagnosis's token pre-flight suggests limits"
    )


def coverage_note(steps: int, pairs_per_step: int, n_train: int) -> str | None:
    """A line for the log when a run of a fixed number of steps sees little of its training split
    (a 60k-pair file at the default max_steps trains on a few hundred pairs)."""
    seen = min(steps * pairs_per_step, n_train)
    if seen >= SMALL_SHARE_OF_TRAINING * n_train:
        return None
    return (
        f"note: {steps} steps of {pairs_per_step} pairs train on {seen:,} of the {n_train:,} training pairs "
        f"({seen / n_train:.1%}); optimisation.epochs (--epochs 1) trains on all of them"
    )


@dataclass
class DataSplit:
    pairs: pd.DataFrame
    train_pairs: ArrayPairs  # made from the token arrays when a batch reads them
    eval_pairs: list[TokenizedPair]
    probe_pairs: list[TokenizedPair]
    batches_per_epoch: int
    total_steps: int


def load_data(
    config: TrainConfig,
    workspace: Workspace,
    pairs: pd.DataFrame | None,
    tokenizer,
    accelerator: Accelerator,
    timer: TimeSplit,
    log: LogFn,
) -> DataSplit:
    """The checked pairs, tokenised (or read from the workspace's token cache) and split into train /
    eval / probe, and the run's length in steps."""
    cfg = config.data
    content_hash = None
    if pairs is None:
        loaded = load_dataset(cfg.dataset, workspace, log=log)
        pairs, content_hash = loaded.table, loaded.content_hash
    df = check_pairs(pairs)
    if cfg.max_pairs is not None:
        df = df.iloc[: cfg.max_pairs].reset_index(drop=True)
    split_seed = config.optimisation.seed if cfg.split_seed is None else cfg.split_seed
    train_idx, held_out_idx = split_pairs(
        df["prompt"],
        split_by=cfg.split_by,
        eval_fraction=cfg.eval_fraction,
        min_eval_pairs=cfg.min_eval_pairs,
        seed=split_seed,
    )
    eval_idx = eval_subset(held_out_idx, config.monitoring.eval_max_pairs, split_seed)
    if len(eval_idx) < len(held_out_idx):
        log(f"evaluating on {len(eval_idx)} of the {len(held_out_idx)} held-out pairs (monitoring.eval_max_pairs)")
    # rank 0 gets here first (main_process_first): it tokenises and saves, the other ranks read the file
    with timer.timed("tokenise"):
        arrays = cached_token_arrays(
            tokenizer,
            df,
            workspace.root,
            max_length=cfg.max_length,
            max_prompt_length=cfg.max_prompt_length,
            data_key=None if content_hash is None else f"dataset:{content_hash}:{len(df)}",
            log=log,
        )
    if note := truncation_note(arrays, response_end(tokenizer), cfg.max_length, cfg.max_prompt_length):
        log(note)
    all_pairs = ArrayPairs(arrays, df["pair_id"].to_numpy())
    # every evaluation reads all eval pairs: made once; training pairs when a batch takes them
    eval_pairs = all_pairs.take(eval_idx)
    train_pairs = all_pairs.subset(train_idx)
    probe_pairs = eval_pairs[: config.monitoring.probe_pairs]
    opt = config.optimisation
    global_bs = opt.batch_size * accelerator.num_processes
    if len(train_pairs) < global_bs:
        raise ValueError(
            f"the training split has {len(train_pairs)} pairs, fewer than one batch of {global_bs}; "
            "lower optimisation.batch_size or data.eval_fraction, or use more pairs"
        )
    batches_per_epoch = len(train_pairs) // global_bs
    if opt.max_steps is not None:
        total_steps = opt.max_steps
    else:
        total_steps = max(1, math.ceil(opt.epochs * batches_per_epoch / opt.grad_accum))
    log(
        f"pairs: {len(df)} (train {len(train_pairs)}, eval {len(eval_pairs)}, "
        f"probe {len(probe_pairs)}); steps: {total_steps}"
    )
    if opt.max_steps is not None and (note := coverage_note(total_steps, global_bs * opt.grad_accum, len(train_pairs))):
        log(note)
    return DataSplit(df, train_pairs, eval_pairs, probe_pairs, batches_per_epoch, total_steps)


# ------------------------------------------------------------------ method: projection, kernel
@dataclass
class Method:
    encoder_reps: EncoderReps | None
    projection: torch.Tensor
    calibration: KernelCalibration | None
    kernel: KernelModule | None


def setup_method(
    config: TrainConfig,
    run_dir: Path,
    accelerator: Accelerator,
    models: LoadedModels,
    split: DataSplit,
    pack_pairs: bool,
    log: LogFn,
) -> Method:
    """The projection, the kernel calibration (read from the run directory on resume) and the kernel."""
    mcfg = config.method
    device = accelerator.device
    encoder_reps = None
    if mcfg.embedding_source == "encoder":
        encoder_reps, dim_in = embed_with_encoder(split.pairs)
    else:
        dim_in = models.hidden_size
    k = min(dim_in, mcfg.projection_dim)
    projection = random_orthogonal_projection(dim_in, k, config.optimisation.seed).float().to(device)
    kcfg = mcfg.kernel
    calibration = None
    if kcfg.name in CALIBRATED_KERNELS:
        cal_path = run_dir / rundir.CALIBRATION
        accelerator.wait_for_everyone()  # every process sees the same file state (rank 0 writes it below)
        if cal_path.is_file():
            calibration = KernelCalibration.load(cal_path)
        else:
            passes = ModelPasses(
                accelerator=accelerator,
                device=device,
                tokenizer=models.tokenizer,
                model=models.model,
                ref_model=models.ref_model,
                reference_cache=models.reference_cache,
                projection=projection,
                encoder_reps=encoder_reps,
                pack_pairs=pack_pairs,
            )
            try:
                reps = calibration_reps(passes, split.train_pairs, config, log)
            except BaseException:
                if models.reference_cache is not None:
                    models.reference_cache.save()  # keep the reference passes already paid for
                raise
            calibration = KernelCalibration.fit(reps, spectral_components=kcfg.spectral_components)
            if accelerator.is_main_process:
                calibration.save(cal_path)
            log(f"kernel calibration: {reps.shape[0]} vectors of dim {reps.shape[1]}")
    kernel = build_kernel(kcfg, calibration) if kcfg.name != "none" else None
    kernel = kernel.to(device) if kernel is not None else None
    return Method(encoder_reps, projection, calibration, kernel)


def embed_with_encoder(df: pd.DataFrame) -> tuple[EncoderReps, int]:
    """Encoder embeddings of every pair's prompt, chosen and rejected text, and their dimension."""
    texts = list(df["prompt"].astype(str)) + list(df["chosen"].astype(str)) + list(df["rejected"].astype(str))
    emb = torch.as_tensor(np.asarray(embed_texts(texts)), dtype=torch.float32)
    n = len(df)
    reps = {pid: (emb[i], emb[n + i], emb[2 * n + i]) for i, pid in enumerate(df["pair_id"])}
    return reps, emb.shape[1]


def record_data_file(
    config: TrainConfig, run_dir: Path, pairs: pd.DataFrame | None, resuming: bool, log: LogFn
) -> None:
    """Stamp the preference file a run reads (rundir.DATA_FILE), before reading it, so a file changed
    while it is read counts as changed. A resumed run keeps the stamp of its first start: its pair ids
    and snapshots came from the file as it was then."""
    record = run_dir / rundir.DATA_FILE
    if resuming and record.exists():
        if rundir.data_file_changed(run_dir):
            log(
                f"{config.data.dataset} changed since this run started: training goes on with the file as it is "
                "now, and the pages show pair ids without texts"
            )
        return
    stamp = rundir.file_stamp(config.data.dataset) if pairs is None and config.data.dataset else None
    if stamp is None:
        record.unlink(missing_ok=True)  # a run directory used again, now for a stored dataset
    else:
        rundir.write_json(record, stamp)


@torch.no_grad()
def calibration_reps(
    passes: ModelPasses, train_pairs: Sequence[TokenizedPair], config: TrainConfig, log: LogFn
) -> torch.Tensor:
    """Projected reference representations of the first calibration_pairs training pairs (3 per pair).

    The pooled reference hidden states are cached with the log-probs, so a later run on the same
    data skips this pass; computing them also fills the log-probs of these pairs."""
    pairs = train_pairs[: config.method.calibration_pairs]
    bs = config.monitoring.eval_batch(config.optimisation.batch_size)
    if passes.encoder_reps is not None:
        chunks = [
            torch.cat(passes.encoder_batch(passes.collate(pairs[i : i + bs]))).cpu() for i in range(0, len(pairs), bs)
        ]
        return torch.cat(chunks)
    workspace_cache = passes.reference_cache
    cache = workspace_cache if workspace_cache is not None else ReferenceCache(None, "run")
    todo = sorted(cache.missing("reps", pairs), key=pair_length)  # similar lengths batched: less padding
    t0, done = time.perf_counter(), 0
    for i in range(0, len(todo), bs):
        chunk = todo[i : i + bs]
        ref = passes.reference_pass(passes.collate(chunk), pool=True)
        if cache is not workspace_cache:  # no workspace cache: keep this run's values in memory
            cache.put("reps", chunk, torch.stack(ref.pooled, dim=1).float().cpu().numpy())
        done += len(chunk)
        if done == len(todo) or (i // bs) % 10 == 9:
            log(f"reference pass for calibration: {done}/{len(todo)} pairs ({time.perf_counter() - t0:.0f}s)")
    cache.save()
    pooled = torch.from_numpy(cache.get("reps", pairs)).to(passes.device)  # B × 3 × H
    return torch.cat([passes.project(pooled[:, j]) for j in range(3)]).cpu()


# ------------------------------------------------------------------ optimiser
def build_optimiser(
    config: TrainConfig,
    accelerator: Accelerator,
    model: torch.nn.Module,
    kernel_params: list[torch.nn.Parameter],
    total_steps: int,
) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    """AdamW with one group for the model and one for the mixture weights, the prepared model, the schedule."""
    opt = config.optimisation
    params = [p for p in model.parameters() if p.requires_grad]
    if accelerator.num_processes > 1:
        # every rank loaded the same frozen weights: DDP need not broadcast them from rank 0 at wrap
        model._ddp_params_and_buffers_to_ignore = [n for n, p in model.named_parameters() if not p.requires_grad]
    groups = [{"params": params, "lr": opt.lr, "weight_decay": opt.weight_decay}]
    if kernel_params:
        groups.append({"params": kernel_params, "lr": config.method.kernel.weight_lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups)
    model, optimizer = accelerator.prepare(model, optimizer)
    name = "constant_with_warmup" if opt.scheduler == "constant" else opt.scheduler
    scheduler = get_scheduler(
        name,
        optimizer,
        num_warmup_steps=math.ceil(opt.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    return model, optimizer, scheduler
