"""What the run directory shows besides the step: evaluation, snapshots, HT-SR, checkpoints, summary.

Read top to bottom: `_monitor` decides at each step whether to evaluate and snapshot, `evaluate`
computes the held-out preference metrics and divergence traces, `snapshot` stores the probe set's
representations and their Davies-Bouldin score, `_htsr` writes the WeightWatcher tables, the
checkpoint pair saves and restores everything an exact resume needs, and `_finish` /
`_write_summary` close the run. The trainer mixes this class in.
"""

from __future__ import annotations

import random
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpo_engine.train import rundir
from dpo_engine.train.data import collate


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
        if final and rundir.read_jsonl(self.run_dir / rundir.EVAL)[-1:] and \
                rundir.read_jsonl(self.run_dir / rundir.EVAL)[-1].get("step") == step:
            return  # the last step already coincided with an eval
        row: dict[str, Any] = {"step": step}
        row.update(self.evaluate())
        if do_snap:
            row["dbs"] = self.snapshot()
        if self.accelerator.is_main_process:
            rundir.append_jsonl(self.run_dir / rundir.EVAL, row)
        self.log(f"eval step {step}: loss_pref {row['loss_pref']:.4f} reward_acc {row['reward_acc']:.3f}"
                 + (f" dbs {row['dbs']:.3f}" if "dbs" in row else ""))

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        from dpo_engine.divergences import all_token_divergences

        self.model.eval()
        bs = self.config.optimisation.batch_size
        n = 0
        sums: dict[str, float] = {"loss_pref": 0.0, "reward_acc": 0.0, "hybrid_acc": 0.0,
                                  "reward_chosen": 0.0, "reward_rejected": 0.0}
        div_sums: dict[str, float] = {}
        positions = 0
        for i in range(0, len(self.eval_pairs), bs):
            batch = collate(self.eval_pairs[i : i + bs], self.tokenizer.pad_token_id).to(self.device)
            terms = self._compute(batch, beta=self.state.beta, train=False, keep_logits=True)
            out, b = terms.out, batch.n_pairs
            sums["loss_pref"] += float(out.loss_pref) * b
            sums["reward_acc"] += float((out.rho > 0).float().sum())
            sums["hybrid_acc"] += float((out.margins > 0).float().sum())
            sums["reward_chosen"] += float(out.reward_chosen.sum())
            sums["reward_rejected"] += float(out.reward_rejected.sum())
            n += b
            n_pos = int(terms.loss_mask.sum())
            if self.config.monitoring.eval_divergences:
                divs = all_token_divergences(terms.policy_logits, terms.ref_logits, terms.loss_mask,
                                             self.config.method.divergence, self._output_embeddings())
            else:
                divs = {key: float("nan") for key in rundir.EVAL_KEYS if key.startswith("div_")}
            for key, value in divs.items():
                div_sums[key] = div_sums.get(key, 0.0) + float(value) * n_pos
            positions += n_pos
        row = {k: v / n for k, v in sums.items()}
        row.update({k: v / max(positions, 1) for k, v in div_sums.items()})
        return row

    @torch.no_grad()
    def snapshot(self) -> float:
        """Store probe-set h(y+), h(y-) under the current policy; return their Davies-Bouldin score."""
        from dpo_engine.analysis.dbs import davies_bouldin

        self.model.eval()
        chosen, rejected = [], []
        bs = self.config.optimisation.batch_size
        for i in range(0, len(self.probe_pairs), bs):
            batch = collate(self.probe_pairs[i : i + bs], self.tokenizer.pad_token_id).to(self.device)
            _, hidden = self._forward(self.model, batch, hidden=True)
            _, h_c, h_r = self._pool(hidden, batch)
            chosen.append(h_c.cpu().numpy())
            rejected.append(h_r.cpu().numpy())
        c = np.concatenate(chosen).astype(np.float16)
        r = np.concatenate(rejected).astype(np.float16)
        if self.accelerator.is_main_process:
            rundir.write_snapshot(self.run_dir, self.state.step, c, r, [p.pair_id for p in self.probe_pairs])
        return davies_bouldin(c, r)

    # ------------------------------------------------------------------ HT-SR
    def _htsr(self, model, filename: str, label: str):
        if not self.accelerator.is_main_process:
            return None
        from dpo_engine.analysis.htsr import analyze_model, weighted_alpha

        t0 = time.perf_counter()
        table = analyze_model(model)
        table.to_csv(self.run_dir / filename, index=False)
        wa = weighted_alpha(table)
        self.log(f"HT-SR {label}: {len(table)} layers, weighted alpha {wa:.4f} ({time.perf_counter() - t0:.1f}s)")
        return wa

    # ------------------------------------------------------------------ checkpoints
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self._unwrapped().named_parameters() if p.requires_grad}

    def _save_checkpoint(self) -> None:
        if not self.accelerator.is_main_process:
            return
        final = rundir.checkpoint_dir(self.run_dir, self.state.step)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(self._trainable_state(), tmp / "weights.pt")
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
        if self.kernel is not None:
            torch.save(self.kernel.state_dict(), tmp / "kernel.pt")
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        torch.save({"step": self.state.step, "micro_index": self.state.micro_index, "beta": self.state.beta,
                    "tokens_seen": self.state.tokens_seen, "train_seconds": self.state.train_seconds,
                    "rng": rng}, tmp / "state.pt")
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
        st = torch.load(path / "state.pt", weights_only=False)
        self.state.step, self.state.micro_index, self.state.beta = st["step"], st["micro_index"], st["beta"]
        self.state.tokens_seen, self.state.train_seconds = st["tokens_seen"], st["train_seconds"]
        torch.set_rng_state(st["rng"]["torch"])
        np.random.set_state(st["rng"]["numpy"])
        random.setstate(st["rng"]["python"])
        if st["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["rng"]["cuda"])
        step = self.state.step
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
        model = self._unwrapped()
        out_dir = self.run_dir / rundir.MODEL
        model.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)
        self.log(f"model saved: {out_dir.relative_to(self.run_dir)} ({'LoRA adapter' if self.config.model.lora else 'full model'})")
        self.htsr_after = None
        if self.config.monitoring.htsr:
            merged = model.merge_and_unload() if self.config.model.lora else model
            self.htsr_after = self._htsr(merged, rundir.HTSR_AFTER, "after")

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
        )
        if summary.get("error"):
            self.log(f"error: {summary['error']}")
        rundir.write_json(self.run_dir / rundir.SUMMARY, summary)
