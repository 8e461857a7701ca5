"""Held-out evaluation and probe-set snapshots (METHOD.md 2): the eval.jsonl row, per-pair margins, snapshots/.

`Evaluator.evaluate` computes the held-out preference metrics on every eval pair, the seven
divergence traces on the first `monitoring.divergence_pairs` of them, and with `snapshot` the probe
set's representations, their Davies-Bouldin score and a cross-validated linear probe's accuracy.
It computes each batch with the step's objective (`TrainingStep.compute`, train=False), so
evaluation and training share one definition.
With several processes each evaluates every N-th batch and the sums, margins and probe
representations are gathered (`EvalShard`), so the row equals the one-process row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather_object

from dpo_engine import rundir
from dpo_engine.analysis.probe import separation
from dpo_engine.data.tokenize import pair_length
from dpo_engine.divergences import all_token_divergences_from_hidden
from dpo_engine.names import DIVERGENCE_METRICS
from dpo_engine.train.config import TrainConfig
from dpo_engine.train.parts import TrainingParts, TrainState
from dpo_engine.train.passes import ForwardOut
from dpo_engine.train.step import TrainingStep

DIVERGENCE_REFERENCE_BYTES = 64 * 2**20  # reference hidden states kept for the divergence subset; beyond, recomputed
EVAL_SUMS = ("loss_pref", "reward_acc", "hybrid_acc", "reward_chosen", "reward_rejected")  # summed, then / pairs


@dataclass
class EvalShard:
    """What one process's share of the held-out batches adds up to; `combine` joins the shares."""

    sums: np.ndarray  # EVAL_SUMS, summed over the shard's pairs
    div_sums: np.ndarray  # DIVERGENCE_METRICS, summed over response positions
    positions: int
    indices: list[int]  # eval pair indices, in the order of `margins`
    margins: np.ndarray
    chosen: dict[int, np.ndarray]  # probe pair index -> h(y+)
    rejected: dict[int, np.ndarray]

    @staticmethod
    def combine(shards: list["EvalShard"]) -> "EvalShard":
        return EvalShard(
            sums=np.sum([s.sums for s in shards], axis=0),
            div_sums=np.sum([s.div_sums for s in shards], axis=0),
            positions=sum(s.positions for s in shards),
            indices=[i for s in shards for i in s.indices],
            margins=np.concatenate([s.margins for s in shards]),
            chosen={k: v for s in shards for k, v in s.chosen.items()},
            rejected={k: v for s in shards for k, v in s.rejected.items()},
        )


class Evaluator:
    """Evaluation and snapshots over the parts setup built; keeps the reference's hidden states on the
    divergence subset for the whole run (`divergence_reference`)."""

    def __init__(
        self, config: TrainConfig, parts: TrainingParts, state: TrainState, step: TrainingStep, run_dir: Path
    ) -> None:
        self.config = config
        self.parts = parts
        self.state = state
        self.step = step
        self.run_dir = run_dir
        self.divergence_reference: dict[int, ForwardOut] = {}  # eval chunk index -> the reference's outputs there

    def eval_chunks(self) -> list[list[int]]:
        """Held-out pair indices in batches that never straddle the divergence subset or the probe set,
        so those prefixes get their extra outputs from the same passes. Within each of those segments
        pairs are grouped by length, so a batch pads to a near neighbour rather than to the longest
        pair of a random few; each pair's values do not depend on its batch."""
        mon, pairs = self.config.monitoring, self.parts.eval_pairs
        bs = mon.eval_batch(self.config.optimisation.batch_size)
        cuts = sorted({0, len(pairs), min(mon.divergence_pairs, len(pairs)), len(self.parts.probe_pairs)})
        chunks = []
        for lo, hi in zip(cuts, cuts[1:]):
            order = sorted(range(lo, hi), key=lambda i: (pair_length(pairs[i]), i))
            chunks += [order[i : i + bs] for i in range(0, len(order), bs)]
        return chunks

    @torch.no_grad()
    def evaluate(self, snapshot: bool = False) -> dict[str, Any]:
        """Held-out preference metrics on every eval pair; the seven divergence traces on the first
        `monitoring.divergence_pairs` of them; with `snapshot`, the probe set's representations
        (written to snapshots/), their Davies-Bouldin score as `dbs` and the linear probe's held-out
        accuracy with its 95 % interval as `probe_acc`, `probe_acc_lo`, `probe_acc_hi`.

        Three things make it cheap without changing a value: pairs are batched with pairs of similar
        length (`eval_chunks`), before the first update the policy's outputs are the reference's
        (cached log-probs and pooled states, no pass at all on a warm cache) and every divergence is
        exactly 0, and the reference's final hidden states on the fixed divergence subset are computed
        once per run and kept (divergence_pairs × response tokens × hidden size floats)."""
        parts, state, step = self.parts, self.state, self.step
        parts.model.eval()
        mon = self.config.monitoring
        accelerator = parts.accelerator
        at_reference = step.reference.policy_is_reference(state.step)
        memo = self.divergence_reference
        device = parts.device
        sums = torch.zeros(len(EVAL_SUMS), dtype=torch.float64, device=device)  # read once, at the end
        div_sums = torch.zeros(len(DIVERGENCE_METRICS), dtype=torch.float64, device=device)
        positions = 0
        indices: list[list[int]] = []
        margins: list[torch.Tensor] = []  # rho per pair of each chunk, kept on the device until the end
        chosen: dict[int, np.ndarray] = {}
        rejected: dict[int, np.ndarray] = {}
        chunks = self.eval_chunks()
        # each process evaluates every num_processes-th batch; the sums and margins are gathered below
        for index in range(accelerator.process_index, len(chunks), accelerator.num_processes):
            chunk = chunks[index]
            in_div = mon.eval_divergences and chunk[0] < mon.divergence_pairs  # chunks never straddle a prefix
            in_probe = snapshot and chunk[0] < len(parts.probe_pairs)
            batch = step.passes.collate([parts.eval_pairs[i] for i in chunk])
            terms = step.compute(
                batch,
                beta=state.beta,
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
            sums += torch.stack(
                [
                    out.loss_pref.detach().double() * b,
                    (out.rho > 0).double().sum(),
                    (out.margins > 0).double().sum(),
                    out.reward_chosen.detach().double().sum(),
                    out.reward_rejected.detach().double().sum(),
                ]
            )
            indices.append(chunk)
            margins.append(out.rho.detach().double())
            if in_div:
                n_pos = terms.policy_hidden.shape[0]
                if not at_reference:  # policy = reference: D(p || p) = 0 for all seven, no need to form logits
                    divs = all_token_divergences_from_hidden(
                        terms.policy_hidden,
                        terms.ref_hidden,
                        terms.policy_head,
                        self.config.method.divergence,
                        step.passes.output_embeddings(),
                        ref_head_weight=terms.ref_head,
                        transform=step.passes.logit_transform,
                    )
                    div_sums += n_pos * torch.tensor(
                        [divs[k] for k in DIVERGENCE_METRICS], dtype=torch.float64, device=device
                    )
                positions += n_pos
            if in_probe:
                chosen.update(zip(chunk, terms.reps[1].float().cpu().numpy()))
                rejected.update(zip(chunk, terms.reps[2].float().cpu().numpy()))
        step.raise_if_not_finite()
        mine = EvalShard(
            sums=sums.cpu().numpy(),
            div_sums=div_sums.cpu().numpy(),
            positions=positions,
            indices=[i for chunk in indices for i in chunk],
            margins=torch.cat(margins).cpu().numpy() if margins else np.zeros(0),
            chosen=chosen,
            rejected=rejected,
        )
        total = EvalShard.combine(gather_object([mine]) if accelerator.num_processes > 1 else [mine])
        n = len(total.indices)
        row: dict[str, Any] = {k: float(v) / n for k, v in zip(EVAL_SUMS, total.sums)}
        row.update(
            {
                k: (float(v) / total.positions if total.positions else float("nan"))
                for k, v in zip(DIVERGENCE_METRICS, total.div_sums)
            }
        )
        if snapshot:
            probe = range(len(parts.probe_pairs))
            row |= self.write_snapshot(
                np.stack([total.chosen[i] for i in probe]), np.stack([total.rejected[i] for i in probe])
            )
        if accelerator.is_main_process:  # per-pair margins: intervals over eval pairs (Compare page)
            by_pair = dict(zip(total.indices, total.margins))
            rundir.append_eval_margins(
                self.run_dir,
                state.step,
                [p.pair_id for p in parts.eval_pairs[:n]],
                np.array([by_pair[i] for i in range(n)]),
            )
        return row

    def write_snapshot(self, chosen: np.ndarray, rejected: np.ndarray) -> dict[str, float]:
        """Store probe-set h(y+), h(y-) under the current policy; return their separation (names.SEPARATION_METRICS),
        computed on the stored float16 vectors so a recomputation from the snapshot gives the same numbers."""
        c, r = chosen.astype(np.float16), rejected.astype(np.float16)
        if self.parts.accelerator.is_main_process:
            pair_ids = [p.pair_id for p in self.parts.probe_pairs]
            rundir.write_snapshot(self.run_dir, self.state.step, c, r, pair_ids)
        return separation(c, r)
