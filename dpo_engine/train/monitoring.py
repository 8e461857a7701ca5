"""What the run directory shows besides the step: evaluation, snapshots, HT-SR, checkpoints, summary.

Read top to bottom: `_monitor` decides at each step whether to evaluate and snapshot, `evaluate`
computes the held-out preference metrics and divergence traces, `snapshot` stores the probe set's
representations and their Davies-Bouldin score, `_htsr` writes the WeightWatcher tables, the
checkpoint pair saves and restores everything an exact resume needs, and `_finish` /
`_write_summary` close the run. The trainer mixes this class in.
"""

from __future__ import annotations

import os
import random
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpo_engine import rundir
from dpo_engine.data.tokenize import pair_length
from dpo_engine.names import DIVERGENCE_METRICS
from dpo_engine.train.step import ForwardOut

DIVERGENCE_REFERENCE_BYTES = 64 * 2**20  # reference hidden states kept for the divergence subset; beyond, recomputed


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Monitoring:
    """Evaluation, snapshots, HT-SR, checkpoints and the summary; mixed into DPOTrainer."""

    # ------------------------------------------------------------------ cadence
    def _monitor(self, final: bool = False) -> None:
        mon = self.config.monitoring
        step = self.state.step
        do_eval = final or step == 0 or step % mon.eval_every == 0
        do_snap = final or step == 0 or step % mon.snapshot_every == 0
        if not (do_eval or do_snap):
            return
        if (
            final
            and rundir.read_jsonl(self.run_dir / rundir.EVAL)[-1:]
            and rundir.read_jsonl(self.run_dir / rundir.EVAL)[-1].get("step") == step
        ):
            return  # the last step already coincided with an eval
        t0 = time.perf_counter()
        row: dict[str, Any] = {"step": step}
        with self.timed("eval"):
            row.update(self.evaluate(snapshot=do_snap))
        if self.accelerator.is_main_process:
            rundir.append_jsonl(self.run_dir / rundir.EVAL, row)
            self._track(row, step, "eval")
        self._save_reference_cache()
        cache = self.reference_cache
        self.log(
            f"eval step {step}: loss_pref {row['loss_pref']:.4f} reward_acc {row['reward_acc']:.3f}"
            + (f" dbs {row['dbs']:.3f}" if "dbs" in row else "")
            + (
                f" ({time.perf_counter() - t0:.1f}s; reference cache {cache.count()} pairs)"
                if cache is not None
                else ""
            )
        )

    # ------------------------------------------------------------------ evaluation and snapshots
    def _eval_chunks(self) -> list[list[int]]:
        """Held-out pair indices in batches that never straddle the divergence subset or the probe set,
        so those prefixes get their extra outputs from the same passes. Within each of those segments
        pairs are grouped by length, so a batch pads to a near neighbour rather than to the longest
        pair of a random four (36 % padded tokens on the HH sample's held-out split, 13 % grouped);
        each pair's values do not depend on its batch."""
        mon, bs, pairs = self.config.monitoring, self.config.optimisation.batch_size, self.eval_pairs
        cuts = sorted({0, len(pairs), min(mon.divergence_pairs, len(pairs)), len(self.probe_pairs)})
        chunks = []
        for lo, hi in zip(cuts, cuts[1:]):
            order = sorted(range(lo, hi), key=lambda i: (pair_length(pairs[i]), i))
            chunks += [order[i : i + bs] for i in range(0, len(order), bs)]
        return chunks

    @torch.no_grad()
    def evaluate(self, snapshot: bool = False) -> dict[str, Any]:
        """Held-out preference metrics on every eval pair; the seven divergence traces on the first
        `monitoring.divergence_pairs` of them; with `snapshot`, the probe set's representations
        (written to snapshots/) and their Davies-Bouldin score as `dbs`.

        Three things make it cheap without changing a value: pairs are batched with pairs of similar
        length (`_eval_chunks`), before the first update the policy's outputs are the reference's
        (cached log-probs and pooled states, no pass at all on a warm cache) and every divergence is
        exactly 0, and the reference's final hidden states on the fixed divergence subset are computed
        once per run and kept (divergence_pairs × response tokens × hidden size floats)."""
        from dpo_engine.divergences import all_token_divergences_from_hidden

        self.model.eval()
        mon = self.config.monitoring
        at_reference = self._policy_is_reference()
        memo = self.divergence_reference
        n = 0
        sums: dict[str, float] = {
            "loss_pref": 0.0,
            "reward_acc": 0.0,
            "hybrid_acc": 0.0,
            "reward_chosen": 0.0,
            "reward_rejected": 0.0,
        }
        div_sums: dict[str, float] = dict.fromkeys(DIVERGENCE_METRICS, 0.0)
        positions = 0
        margins: dict[int, float] = {}  # eval pair index -> rho, written in the held-out order
        chosen: dict[int, np.ndarray] = {}
        rejected: dict[int, np.ndarray] = {}
        for index, chunk in enumerate(self._eval_chunks()):
            in_div = mon.eval_divergences and n < mon.divergence_pairs
            in_probe = snapshot and n < len(self.probe_pairs)
            batch = self._collate([self.eval_pairs[i] for i in chunk])
            terms = self._compute(
                batch,
                beta=self.state.beta,
                train=False,
                keep_hidden=in_div,
                want_reps=in_probe,
                policy_is_reference=at_reference,
                reference=memo.get(index) if in_div else None,
            )
            if (
                in_div
                and index not in memo
                and sum(r.hidden.nbytes for r in memo.values()) + terms.ref_hidden.nbytes <= DIVERGENCE_REFERENCE_BYTES
            ):
                memo[index] = ForwardOut(terms.ref_logps, None, terms.ref_hidden, terms.ref_head)
            out, b = terms.out, batch.n_pairs
            sums["loss_pref"] += float(out.loss_pref) * b
            sums["reward_acc"] += float((out.rho > 0).float().sum())
            sums["hybrid_acc"] += float((out.margins > 0).float().sum())
            sums["reward_chosen"] += float(out.reward_chosen.sum())
            sums["reward_rejected"] += float(out.reward_rejected.sum())
            margins.update(zip(chunk, out.rho.detach().float().cpu().numpy()))
            n += b
            if in_div:
                n_pos = terms.policy_hidden.shape[0]
                if at_reference:  # policy = reference: D(p || p) = 0 for all seven, no need to form logits
                    divs = dict.fromkeys(div_sums, 0.0)
                else:
                    divs = all_token_divergences_from_hidden(
                        terms.policy_hidden,
                        terms.ref_hidden,
                        terms.policy_head,
                        self.config.method.divergence,
                        self._output_embeddings(),
                        ref_head_weight=terms.ref_head,
                    )
                for key, value in divs.items():
                    div_sums[key] += float(value) * n_pos
                positions += n_pos
            if in_probe:
                chosen.update(zip(chunk, terms.reps[1].cpu().numpy()))
                rejected.update(zip(chunk, terms.reps[2].cpu().numpy()))
        row: dict[str, Any] = {k: v / n for k, v in sums.items()}
        row.update({k: (v / positions if positions else float("nan")) for k, v in div_sums.items()})
        if snapshot:
            probe = range(len(self.probe_pairs))
            row["dbs"] = self._write_snapshot(
                np.stack([chosen[i] for i in probe]), np.stack([rejected[i] for i in probe])
            )
        if self.accelerator.is_main_process:  # per-pair margins: intervals over eval pairs (Compare page)
            rundir.append_eval_margins(
                self.run_dir,
                self.state.step,
                [p.pair_id for p in self.eval_pairs[:n]],
                np.array([margins[i] for i in range(n)]),
            )
        return row

    def _write_snapshot(self, chosen: np.ndarray, rejected: np.ndarray) -> float:
        """Store probe-set h(y+), h(y-) under the current policy; return their Davies-Bouldin score."""
        from dpo_engine.analysis.dbs import davies_bouldin

        c, r = chosen.astype(np.float16), rejected.astype(np.float16)
        if self.accelerator.is_main_process:
            rundir.write_snapshot(self.run_dir, self.state.step, c, r, [p.pair_id for p in self.probe_pairs])
        return davies_bouldin(c, r)

    def _save_reference_cache(self) -> None:
        if getattr(self, "reference_cache", None) is not None and self.accelerator.is_main_process:
            self.reference_cache.save()

    # ------------------------------------------------------------------ trackers
    def _track(self, row: dict[str, Any], step: int, split: str) -> None:
        """Forward a metrics/eval row to the trackers named in monitoring.report_to (none by default)."""
        report_to = self.config.monitoring.report_to
        if not report_to:
            return
        if getattr(self, "_trackers", None) is None:
            from dpo_engine.tracking import open_trackers

            self._trackers = open_trackers(list(report_to), self.run_dir, self.run_dir.name, self.config.resolved())
        self._trackers.log(row, step=step, split=split)

    def _close_trackers(self) -> None:
        trackers = getattr(self, "_trackers", None)
        if trackers is not None:
            trackers.close()
            self._trackers = None

    # ------------------------------------------------------------------ HT-SR
    def _htsr(self, model, filename: str, label: str, known=None):
        if not self.accelerator.is_main_process:
            return None
        from dpo_engine.analysis.htsr import analyze_model, weighted_alpha

        t0 = time.perf_counter()
        with self.timed("htsr"):
            table = analyze_model(model, known=known)
        table.to_csv(self.run_dir / filename, index=False)
        wa = weighted_alpha(table)
        reused = f", {len(known)} unchanged layers' rows reused" if known is not None and len(known) else ""
        self.log(
            f"HT-SR {label}: {len(table)} layers, weighted alpha {wa:.4f} ({time.perf_counter() - t0:.1f}s{reused})"
        )
        return wa

    def _htsr_before(self, model, key: str):
        """HT-SR of the untrained model, reused from the workspace when this exact model was analysed before."""
        from dpo_engine.train.reference import CACHE_DIR

        cached = self.workspace.root / CACHE_DIR / f"{key}.{rundir.HTSR_BEFORE}"
        if cached.is_file() and self.accelerator.is_main_process:
            from dpo_engine.analysis.htsr import weighted_alpha

            shutil.copyfile(cached, self.run_dir / rundir.HTSR_BEFORE)
            wa = weighted_alpha(rundir.read_htsr(self.run_dir, "before"))
            self.log(f"HT-SR before: weighted alpha {wa:.4f} (same model analysed before)")
            return wa
        wa = self._htsr(model, rundir.HTSR_BEFORE, "before")
        if self.accelerator.is_main_process:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
            shutil.copyfile(self.run_dir / rundir.HTSR_BEFORE, tmp)
            os.replace(tmp, cached)
        return wa

    # ------------------------------------------------------------------ checkpoints
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self._unwrapped().named_parameters() if p.requires_grad}

    def _save_checkpoint(self) -> None:
        if self.accelerator.is_main_process:
            with self.timed("checkpoint"):
                self._write_checkpoint()
        self.accelerator.wait_for_everyone()  # no process runs ahead of a checkpoint it might resume from

    def _write_checkpoint(self) -> None:
        final = rundir.checkpoint_dir(self.run_dir, self.state.step)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(self._trainable_state(), tmp / "weights.pt")
        self._save_reference_cache()
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
        if self.kernel is not None:
            torch.save(self.kernel.state_dict(), tmp / "kernel.pt")
        rng = {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        torch.save(
            {
                "step": self.state.step,
                "micro_index": self.state.micro_index,
                "beta": self.state.beta,
                "tokens_seen": self.state.tokens_seen,
                "train_seconds": self.state.train_seconds,
                "rng": rng,
            },
            tmp / rundir.CHECKPOINT_STATE,
        )
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for older in (self.run_dir / rundir.CHECKPOINTS).iterdir():  # keep only the newest complete checkpoint
            if older != final and older.name.startswith("step_"):
                shutil.rmtree(older, ignore_errors=True)
        self.log(f"checkpoint saved: {final.relative_to(self.run_dir)}")

    def _load_checkpoint(self, path: Path) -> None:
        weights = torch.load(path / "weights.pt", map_location="cpu")
        named = dict(self._unwrapped().named_parameters())
        missing = [n for n in weights if n not in named]
        if missing:
            raise ValueError(f"checkpoint {path} does not match this model/config (unknown parameters: {missing[:3]})")
        with torch.no_grad():
            for n, t in weights.items():
                named[n].copy_(t.to(named[n].device))
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        if self.kernel is not None and (path / "kernel.pt").is_file():
            self.kernel.load_state_dict(torch.load(path / "kernel.pt", map_location=self.device))
        st = torch.load(path / rundir.CHECKPOINT_STATE, weights_only=False)
        self.state.step, self.state.micro_index, self.state.beta = st["step"], st["micro_index"], st["beta"]
        self.state.tokens_seen, self.state.train_seconds = st["tokens_seen"], st["train_seconds"]
        torch.set_rng_state(st["rng"]["torch"])
        np.random.set_state(st["rng"]["numpy"])
        random.setstate(st["rng"]["python"])
        if st["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["rng"]["cuda"])
        step = self.state.step
        if self.accelerator.is_main_process:
            rundir.truncate_jsonl_after_step(self.run_dir / rundir.METRICS, step)
            rundir.truncate_jsonl_after_step(self.run_dir / rundir.EVAL, step)
            for s in rundir.list_snapshots(self.run_dir):
                if s > step:
                    rundir.snapshot_path(self.run_dir, s).unlink(missing_ok=True)
        self.log(f"resumed from {path.relative_to(self.run_dir)} (step {step}, beta {self.state.beta:g})")

    # ------------------------------------------------------------------ end of run
    def _finish(self) -> None:
        if not self.accelerator.is_main_process:
            return
        with self.timed("save_model"):
            self._save_model()

    def _save_model(self) -> None:
        model = self._unwrapped()
        out_dir = self.run_dir / rundir.MODEL
        model.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)
        self.log(
            f"model saved: {out_dir.relative_to(self.run_dir)} "
            f"({'LoRA adapter' if self.config.model.lora else 'full model'})"
        )
        self.htsr_after = None
        if self.config.monitoring.htsr:
            known = self._htsr_unchanged_layers(model) if self.config.model.lora else None
            merged = model.merge_and_unload() if self.config.model.lora else model
            self.htsr_after = self._htsr(merged, rundir.HTSR_AFTER, "after", known=known)

    def _htsr_unchanged_layers(self, model):
        """Rows of the "before" table for layers with no trainable parameter in the LoRA model (neither
        adapters nor saved copies: their weights are the base model's); the HT-SR "after" reuses them
        instead of repeating their SVDs."""
        before = rundir.read_htsr(self.run_dir, "before") if self.accelerator.is_main_process else None
        if before is None or "longname" not in before or "layer_id" not in before:
            return None
        modules = {name.removeprefix("base_model.model."): module for name, module in model.named_modules()}
        # What training or the merge writes: trainable parameters, and the base weights of LoRA layers
        # (by storage, so a head tied to the embedding counts for both).
        touched = {p.data_ptr() for p in model.parameters() if p.requires_grad}
        for module in modules.values():
            if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
                touched.update(p.data_ptr() for p in module.base_layer.parameters())
        frozen = {
            name
            for name, module in modules.items()
            if not any(p.requires_grad or p.data_ptr() in touched for p in module.parameters())
        }
        return before[before["longname"].isin(frozen) & (before["layer_id"] > 0)]

    def _write_summary(self, summary: dict[str, Any], t_start: float) -> None:
        if hasattr(self, "accelerator") and not self.accelerator.is_main_process:
            return
        metrics = rundir.read_jsonl(self.run_dir / rundir.METRICS)
        evals = rundir.read_jsonl(self.run_dir / rundir.EVAL)
        device = getattr(self, "device", torch.device("cpu"))
        before = getattr(self, "htsr_before", None)
        if before is None:
            prev = rundir.read_htsr(self.run_dir, "before")
            if prev is not None:
                from dpo_engine.analysis.htsr import weighted_alpha

                before = weighted_alpha(prev)
        summary.update(
            steps_completed=self.state.step,
            total_steps=getattr(self, "total_steps", None),
            final_metrics=metrics[-1] if metrics else None,
            final_eval=evals[-1] if evals else None,
            wall_time_s=time.perf_counter() - t_start,
            train_time_s=self.state.train_seconds,
            tokens_per_s=self.state.tokens_seen / self.state.train_seconds if self.state.train_seconds else None,
            peak_memory_mb=peak_memory_mb(device),
            device=str(device),
            weighted_alpha_before=before,
            weighted_alpha_after=getattr(self, "htsr_after", None),
            final_beta=self.state.beta,
            time_split_s={**{k: round(v, 3) for k, v in self.time_split.items()}, "train": self.state.train_seconds},
        )
        if summary.get("error"):
            self.log(f"error: {summary['error']}")
        rundir.write_json(self.run_dir / rundir.SUMMARY, summary)
