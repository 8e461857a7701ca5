"""Every faster path of the training step equals the plain path it replaces.

- packed pairs (prompt computed once, block attention mask) vs separate chosen/rejected rows, and
  both vs an independent per-sequence forward with full logits and `sequence_logps`;
- flat response-token log-probs and ε-DPO steps vs the padded (B × T × V) functions;
- the workspace reference cache vs the live reference pass, and a whole run with every speed path
  on vs every one off (losses, gradient norms, eval rows, ε-DPO beta).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from dpo_engine import rundir
from dpo_engine.data.tokenize import TokenizedPair
from dpo_engine.losses import epsilon_dpo_steps, epsilon_dpo_steps_tokens, sequence_logps, sum_by_sequence, token_logps
from dpo_engine.train.checkpoint import save_reference_cache
from dpo_engine.train.config import TrainConfig
from dpo_engine.train.data import collate, collate_packed
from dpo_engine.train.reference import ReferenceCache, model_key, pair_key
from dpo_engine.train.trainer import DPOTrainer, train
from tests.test_train import make_config, toy_pairs


def varied_pairs(n: int = 24) -> pd.DataFrame:
    """Prompts and responses of different lengths, so padding and packing offsets differ per row."""
    rng = np.random.default_rng(0)
    words = "the sky is blue green red why how when what cat dog bird sun rain cloud".split()

    def text(k: int) -> str:
        return " ".join(rng.choice(words, size=k))

    return pd.DataFrame(
        {
            "pair_id": [f"v{i}" for i in range(n)],
            "prompt": [text(int(rng.integers(1, 12))) for _ in range(n)],
            "chosen": [text(int(rng.integers(1, 15))) for _ in range(n)],
            "rejected": [text(int(rng.integers(1, 15))) for _ in range(n)],
        }
    )


@pytest.fixture
def lora_trainer(workspace, tmp_path):
    cfg = make_config(model={"lora": True, "lora_dropout": 0.0}, data={"max_length": 96, "max_prompt_length": 64})
    trainer = DPOTrainer(cfg, tmp_path / "run", workspace=workspace, pairs=varied_pairs(), log=lambda m: None)
    trainer.setup()
    with torch.no_grad():  # move the adapters off zero so policy and reference differ
        for name, p in trainer.parts.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return trainer


def independent_logps(model, pairs: list[TokenizedPair]) -> torch.Tensor:
    """Each sequence alone (no padding, no packing), full logits, the padded-tensor sequence_logps."""
    out = []
    for half in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            ids = torch.tensor([p.prompt_ids + getattr(p, half)])
            logits = model(input_ids=ids).logits[:, :-1]
            mask = torch.zeros_like(ids[:, 1:], dtype=torch.bool)
            mask[:, max(len(p.prompt_ids), 1) - 1 :] = True
            out.append(sequence_logps(logits, ids[:, 1:], mask))
    return torch.cat(out)


def with_short_pairs(pairs: list[TokenizedPair]) -> list[TokenizedPair]:
    """The pairs plus two cut-down copies short enough to share a packed row with another pair."""
    short = [
        TokenizedPair(f"short{i}", p.prompt_ids[-3:], p.chosen_ids[:4], p.rejected_ids[:2])
        for i, p in enumerate(pairs[:2])
    ]
    return [pairs[0], short[0], *pairs[1:], short[1]]


def test_packed_and_plain_layouts_give_the_same_logps_and_states(lora_trainer):
    tr = lora_trainer
    pairs = with_short_pairs(tr.parts.train_pairs[:6])
    assert len({len(p.prompt_ids) for p in pairs}) > 1 and len({len(p.chosen_ids) for p in pairs}) > 1
    plain_batch = collate(pairs, tr.parts.tokenizer.pad_token_id)
    packed_batch = collate_packed(pairs, tr.parts.tokenizer.pad_token_id)
    with torch.no_grad():
        plain = tr.passes.forward(tr.parts.model, plain_batch, pool=True)
        packed = tr.passes.forward(tr.parts.model, packed_batch, pool=True)
        alone = independent_logps(tr.parts.model, pairs)
    np.testing.assert_allclose(packed.logps.numpy(), alone.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(plain.logps.numpy(), alone.numpy(), rtol=0, atol=1e-4)
    assert packed_batch.input_ids.numel() < plain_batch.input_ids.numel()  # the prompt is read once
    assert packed_batch.input_ids.shape[0] < len(pairs)  # and short pairs share a row
    # Same response tokens in both (grouped by sequence, in order), same final hidden states there.
    by_seq = [torch.argsort(b.token_seq, stable=True) for b in (plain_batch, packed_batch)]
    assert torch.equal(plain_batch.token_labels[by_seq[0]], packed_batch.token_labels[by_seq[1]])
    np.testing.assert_allclose(packed.hidden[by_seq[1]].numpy(), plain.hidden[by_seq[0]].numpy(), rtol=0, atol=1e-4)
    for a, b in zip(packed.pooled, plain.pooled):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-5)


def test_pack_rows_fills_rows_first_fit_decreasing():
    from dpo_engine.train.data import pack_rows

    assert pack_rows([5, 3, 9, 4, 1], 9) == [[2], [0, 3], [1, 4]]
    assert pack_rows([7], 7) == [[0]]
    assert pack_rows([8, 8, 8], 8) == [[0], [1], [2]]


def test_packed_gradients_equal_plain_gradients(lora_trainer):
    tr = lora_trainer
    pairs = with_short_pairs(tr.parts.train_pairs[:2])
    assert collate_packed(pairs, tr.parts.tokenizer.pad_token_id).input_ids.shape[0] < len(pairs)
    grads = []
    for build in (collate, collate_packed):
        tr.parts.model.zero_grad(set_to_none=True)
        out = tr.passes.forward(tr.parts.model, build(pairs, tr.parts.tokenizer.pad_token_id), pool=False)
        (out.logps[:4] - out.logps[4:]).sum().backward()  # 4 pairs: chosen minus rejected
        grads.append(torch.cat([p.grad.flatten() for p in tr.parts.model.parameters() if p.requires_grad]))
    np.testing.assert_allclose(grads[1].numpy(), grads[0].numpy(), rtol=1e-4, atol=1e-5)


def test_chunked_head_gradients_equal_the_models_own_full_logits(lora_trainer):
    """The step's log-probs (head a chunk of rows at a time, gradient formed in the forward pass) back-
    propagate exactly what the model's own full-vocabulary logits with sequence_logps do."""
    tr = lora_trainer
    pairs = tr.parts.train_pairs[:3]
    weights = torch.linspace(0.5, 2.0, 6)
    grads = []
    for run in ("step", "independent"):
        tr.parts.model.zero_grad(set_to_none=True)
        if run == "step":
            batch = collate_packed(pairs, tr.parts.tokenizer.pad_token_id)
            logps = tr.passes.forward(tr.parts.model, batch, pool=False).logps
        else:
            logps = independent_logps(tr.parts.model, pairs)
        (logps * weights).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in tr.parts.model.parameters() if p.requires_grad]))
    assert float(grads[1].abs().max()) > 0
    np.testing.assert_allclose(grads[0].numpy(), grads[1].numpy(), rtol=1e-4, atol=1e-5)


def test_flat_token_logps_and_epsilon_steps_equal_the_padded_functions():
    gen = torch.Generator().manual_seed(0)
    b, t, v, eps = 3, 7, 11, 0.3
    logits = torch.randn(2 * b, t, v, generator=gen) * 3
    ref = logits + torch.randn(2 * b, t, v, generator=gen)
    labels = torch.randint(0, v, (2 * b, t), generator=gen)
    mask = torch.rand(2 * b, t, generator=gen) > 0.3
    rows, cols = mask.nonzero().unbind(-1)
    flat = sum_by_sequence(token_logps(logits[rows, cols], labels[rows, cols]), rows, 2 * b)
    np.testing.assert_allclose(flat.numpy(), sequence_logps(logits, labels, mask).numpy(), rtol=1e-6, atol=1e-5)
    padded = epsilon_dpo_steps(
        logits[:b], ref[:b], labels[:b], mask[:b], logits[b:], ref[b:], labels[b:], mask[b:], eps
    )
    tokens = epsilon_dpo_steps_tokens(logits[rows, cols], ref[rows, cols], labels[rows, cols], rows, b, eps)
    assert torch.equal(tokens, padded) and padded.abs().sum() > 0


def test_reference_cache_equals_live_reference_and_survives_a_reload(lora_trainer, workspace):
    tr = lora_trainer
    pairs = tr.parts.train_pairs[:4]
    batch = tr.passes.collate(pairs)
    live = tr.passes.reference_pass(batch).logps  # stores into the run's cache
    cached = tr.parts.reference_cache.lookup_logps(pairs)
    np.testing.assert_array_equal(cached.float().numpy(), live.numpy())
    tr.parts.reference_cache.save()
    reread = ReferenceCache(workspace.root, tr.parts.reference_cache.path.stem)
    np.testing.assert_array_equal(reread.lookup_logps(pairs).numpy(), cached.numpy())
    assert reread.lookup_logps(tr.parts.train_pairs[4:8]) is None  # never seen: a miss, not a guess
    # The reference is the base model: its log-probs differ from the (moved) policy's.
    with torch.no_grad():
        policy = tr.passes.forward(tr.parts.model, batch, pool=False).logps
    assert (policy - live).abs().max() > 1e-3


def test_cache_keys_change_with_weights_precision_and_tokens():
    model = torch.nn.Linear(4, 3)
    key = model_key(model, torch.float32, torch.device("cpu"))
    assert key == model_key(model, torch.float32, torch.device("cpu"))
    assert key != model_key(model, torch.bfloat16, torch.device("cpu"))
    with torch.no_grad():
        model.weight[0, 0] += 1e-6
    assert key != model_key(model, torch.float32, torch.device("cpu"))
    a = TokenizedPair("a", [1, 2], [3], [4, 5])
    assert pair_key(a) == pair_key(TokenizedPair("other id", [1, 2], [3], [4, 5]))
    assert pair_key(a) != pair_key(TokenizedPair("a", [1], [2, 3], [4, 5]))  # same tokens, other boundary
    assert pair_key(a) != pair_key(TokenizedPair("a", [1, 2], [3], [4, 5, 6]))
    # the bytes hashed are those of every earlier version, so caches saved before still match
    import hashlib

    old = hashlib.sha1()
    for ids in ([1, 2], [3], [4, 5]):
        old.update(np.asarray([len(ids)] + ids, dtype=np.int64).tobytes())
    assert pair_key(a) == old.digest()
    assert pair_key(TokenizedPair("e", [], [7], [])) != pair_key(TokenizedPair("e", [7], [], []))


def test_storing_cached_pairs_reads_nothing_back_from_the_device():
    """A live reference pass over pairs already cached records nothing, so on a GPU it costs no copy:
    a meta tensor, which cannot be copied to the host at all, stands in for the device's values."""
    cache = ReferenceCache(None, "k")
    pairs = [TokenizedPair("a", [1], [2], [3]), TokenizedPair("b", [4], [5], [6])]
    cache.store_logps(pairs, torch.tensor([-1.0, -2.0, -3.0, -4.0]))
    cache.store_logps(pairs, torch.empty(4, device="meta"))
    assert cache.lookup_logps(pairs).tolist() == [-1.0, -2.0, -3.0, -4.0]
    with pytest.raises(NotImplementedError):
        cache.store_logps([TokenizedPair("c", [7], [8], [9])], torch.empty(2, device="meta"))


@pytest.mark.parametrize(
    "method",
    [
        {"kernel": {"name": "none"}, "divergence": {"name": "none"}, "loss": {"gamma": 0.0}},
        {"kernel": {"name": "hmk"}, "divergence": {"name": "js"}, "loss": {"gamma": 0.5, "epsilon_dpo": 0.05}},
    ],
    ids=["plain-dpo", "hmk-js-epsilon"],
)
def test_run_with_speed_paths_equals_run_without(workspace, tmp_path, method):
    """Same config, every speed path on vs off: the same metrics, evals and ε-DPO beta; a second run
    on the same workspace reads the reference cache and still matches."""

    def run(name: str, fast: bool):
        cfg = make_config(
            model={"lora": True, "lora_dropout": 0.0},
            method=method,
            optimisation={"max_steps": 4, "pack_pairs": fast, "reference_cache": fast},
            monitoring={"eval_every": 2, "snapshot_every": 2, "eval_divergences": True, "divergence_pairs": 4},
        )
        summary = train(cfg, tmp_path / name, workspace=workspace, pairs=varied_pairs(40))
        assert summary["status"] == "succeeded", summary["error"]
        return rundir.read_metrics(tmp_path / name), rundir.read_eval(tmp_path / name)

    slow_m, slow_e = run("slow", False)
    fast_m, fast_e = run("fast", True)
    again_m, again_e = run("again", True)  # cache warm now
    layout = ("tokens_per_s", "computed_tokens", "padding_tokens")  # what packing changes, and time
    cols = [c for c in slow_m.columns if c not in layout]
    assert (fast_m["tokens"] == slow_m["tokens"]).all()  # the same pairs' tokens ...
    assert (fast_m["computed_tokens"] < slow_m["computed_tokens"]).all()  # ... read in fewer positions
    assert (slow_m["padding_tokens"] >= 0).all() and (fast_m["padding_tokens"] >= 0).all()
    for m, e in ((fast_m, fast_e), (again_m, again_e)):
        np.testing.assert_allclose(m[cols].to_numpy(float), slow_m[cols].to_numpy(float), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(e.to_numpy(float), slow_e.to_numpy(float), rtol=1e-4, atol=1e-5, equal_nan=True)
    assert not slow_e["div_kl"].isna().any()
    cache_files = list((workspace.root / "reference_cache").glob("*.npz"))
    assert len(cache_files) == 1


def test_max_prompt_length_defaults_to_half_of_max_length():
    cfg = TrainConfig.model_validate({"data": {"dataset": "d", "max_length": 128}})
    assert cfg.data.max_prompt_length == 64
    assert cfg.resolved()["data"]["max_prompt_length"] == 64
    assert TrainConfig.model_validate({"data": {"dataset": "d"}}).data.max_prompt_length == 128


def test_htsr_before_is_reused_for_the_same_model(workspace, tmp_path):
    """The untrained model's HT-SR table depends on its weights only: a second run copies it."""
    logs: list[str] = []
    cfg = make_config(optimisation={"max_steps": 1}, monitoring={"htsr": True})
    for name in ("first", "second"):
        summary = train(cfg, tmp_path / name, workspace=workspace, pairs=toy_pairs(24), log=logs.append)
        assert summary["status"] == "succeeded", summary["error"]
    first, second = (rundir.read_htsr(tmp_path / n, "before") for n in ("first", "second"))
    pd.testing.assert_frame_equal(first, second)
    assert sum("analysed before" in line for line in logs) == 1
    assert rundir.read_summary(tmp_path / "second")["weighted_alpha_before"] == pytest.approx(
        rundir.read_summary(tmp_path / "first")["weighted_alpha_before"]
    )


def test_htsr_after_reuses_frozen_layers_and_equals_a_full_analysis(workspace, tmp_path):
    """With LoRA the embedding and LM head keep the base weights: the "after" table reuses their
    "before" rows and equals a full WeightWatcher analysis of the saved, merged model."""
    from peft import PeftModel

    from dpo_engine.analysis.htsr import analyze_model
    from dpo_engine.models.loading import load_policy

    cfg = make_config(
        model={"lora": True, "lora_dropout": 0.0}, optimisation={"max_steps": 2}, monitoring={"htsr": True}
    )
    logs: list[str] = []
    summary = train(cfg, tmp_path / "run", workspace=workspace, pairs=toy_pairs(24), log=logs.append)
    assert summary["status"] == "succeeded", summary["error"]
    assert any(line.startswith("HT-SR after") and "2 unchanged layers' rows reused" in line for line in logs), logs
    after = rundir.read_htsr(tmp_path / "run", "after")
    before = rundir.read_htsr(tmp_path / "run", "before")
    base, _ = load_policy("tiny-random", workspace=workspace)
    merged = PeftModel.from_pretrained(base, tmp_path / "run" / rundir.MODEL).merge_and_unload()
    full = analyze_model(merged)
    full.to_csv(tmp_path / "full.csv", index=False)  # the same round trip as the run's table
    pd.testing.assert_frame_equal(after, pd.read_csv(tmp_path / "full.csv"))
    assert set(after["longname"]) >= {"model.embed_tokens", "lm_head"}
    changed = after["longname"].str.contains("proj")
    assert changed.any() and not np.allclose(
        after.loc[changed, "lambda_max"], before.loc[changed, "lambda_max"], rtol=0, atol=0
    )


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full-finetune"])
def test_step0_evaluation_from_the_reference_equals_a_live_policy_pass(tmp_path, monkeypatch, lora):
    """Before the first update the policy's outputs are the reference's: the step-0 eval row and
    snapshot taken from the reference (one pass on a cold cache, only the divergence subset on a
    warm one) equal those of the plain path, which runs the policy and the reference separately."""
    from dpo_engine.workspace import Workspace

    method = {"kernel": {"name": "hmk"}, "divergence": {"name": "js"}, "loss": {"gamma": 0.5}}
    cfg = make_config(
        model={"lora": lora, "lora_dropout": 0.0},
        method=method,
        optimisation={"max_steps": 2},
        monitoring={"eval_divergences": True, "divergence_pairs": 4, "probe_pairs": 8},
    )

    def step0(run: str, ws: str, live: bool):
        tr = DPOTrainer(
            cfg, tmp_path / run, workspace=Workspace.resolve(tmp_path / ws), pairs=varied_pairs(40), log=lambda m: None
        )
        tr.setup()
        assert tr.step.reference.policy_is_reference(tr.state.step)
        if live:
            monkeypatch.setattr(tr.step.reference, "policy_is_reference", lambda step: False)
        forwarded: list[int] = []
        forward = tr.passes.forward
        monkeypatch.setattr(
            tr.passes,
            "forward",
            lambda model, batch, **kw: forwarded.append(batch.n_pairs) or forward(model, batch, **kw),
        )
        row = tr.evaluator.evaluate(snapshot=True)
        save_reference_cache(tr.parts)
        return tr, row, rundir.load_snapshot(tmp_path / run, 0), sum(forwarded)

    _, plain, plain_snap, plain_n = step0("plain", "ws_plain", live=True)
    tr, cold, cold_snap, cold_n = step0("cold", "ws_fast", live=False)
    _, warm, warm_snap, warm_n = step0("warm", "ws_fast", live=False)  # same workspace: the cache is warm
    n_eval = len(tr.parts.eval_pairs)
    assert plain_n == 2 * n_eval  # the policy and the reference on every eval pair
    assert cold_n == n_eval  # the reference once per eval pair, nothing else
    assert warm_n == 4  # only the divergence subset, whose logits the cache does not hold
    assert plain["div_js"] == pytest.approx(0.0, abs=1e-6)  # a live policy pass agrees the two are equal
    for fast, snap in ((cold, cold_snap), (warm, warm_snap)):
        assert fast.keys() == plain.keys()
        for key, value in plain.items():
            assert fast[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
        for side in ("chosen", "rejected"):
            np.testing.assert_allclose(snap[side].astype(float), plain_snap[side].astype(float), atol=2e-3)
    # One update later the policy has moved, and evaluation runs it live again.
    tr.step.run()
    assert not tr.step.reference.policy_is_reference(tr.state.step)


def test_divergence_subset_reference_is_computed_once_per_run(workspace, tmp_path, monkeypatch):
    """The reference's logits on the fixed divergence subset never change: later evaluations reuse
    them and give the divergence traces a fresh reference pass would give."""
    cfg = make_config(
        model={"lora": True, "lora_dropout": 0.0},
        optimisation={"max_steps": 2},
        monitoring={"eval_divergences": True, "divergence_pairs": 4},
    )
    tr = DPOTrainer(cfg, tmp_path / "run", workspace=workspace, pairs=varied_pairs(40), log=lambda m: None)
    tr.setup()
    tr.evaluator.evaluate()
    tr.step.run()
    passes: list[int] = []
    reference_pass = tr.passes.reference_pass
    monkeypatch.setattr(
        tr.passes, "reference_pass", lambda batch, **kw: passes.append(batch.n_pairs) or reference_pass(batch, **kw)
    )
    reused = tr.evaluator.evaluate()
    assert passes == []
    tr.evaluator.divergence_reference.clear()
    fresh = tr.evaluator.evaluate()
    assert sum(passes) == 4
    for key in (k for k in reused if k.startswith("div_")):
        assert reused[key] == pytest.approx(fresh[key], rel=1e-6, abs=1e-9), key
    assert reused["div_kl"] > 0


def test_length_grouped_evaluation_equals_the_held_out_order(workspace, tmp_path, monkeypatch):
    """Evaluation batches pairs of similar length (less padding); every value it writes (the eval
    row, each pair's margin, each probe pair's representations) equals batching in the held-out order."""
    from dpo_engine.data.tokenize import pair_length
    from dpo_engine.train import evaluation

    cfg = make_config(
        data={"min_eval_pairs": 20},
        model={"lora": True, "lora_dropout": 0.0},
        optimisation={"max_steps": 2},
        monitoring={"eval_divergences": True, "divergence_pairs": 4, "probe_pairs": 8},
    )
    tr = DPOTrainer(cfg, tmp_path / "run", workspace=workspace, pairs=varied_pairs(40), log=lambda m: None)
    tr.setup()
    with torch.no_grad():  # policy != reference, so every value comes from a live policy pass
        for name, p in tr.parts.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    margins: list[dict] = []
    snapshots: list[tuple[np.ndarray, np.ndarray]] = []
    monkeypatch.setattr(rundir, "append_eval_margins", lambda run_dir, step, ids, m: margins.append(dict(zip(ids, m))))
    monkeypatch.setattr(tr.evaluator, "write_snapshot", lambda c, r: snapshots.append((c, r)) or {"dbs": 0.0})

    def padded_tokens(chunks):
        return sum(len(c) * max(pair_length(tr.parts.eval_pairs[i]) for i in c) for c in chunks)

    grouped_chunks = tr.evaluator.eval_chunks()
    grouped = tr.evaluator.evaluate(snapshot=True)
    monkeypatch.setattr(evaluation, "pair_length", lambda pair: 0)  # every pair the same length: held-out order
    plain_chunks = tr.evaluator.eval_chunks()
    assert sum(plain_chunks, []) == list(range(len(tr.parts.eval_pairs)))
    assert sorted(sum(grouped_chunks, [])) == list(range(len(tr.parts.eval_pairs)))
    assert padded_tokens(grouped_chunks) < padded_tokens(plain_chunks)
    # no batch straddles the divergence subset or probe set
    for lo, hi in ((0, 4), (4, 8), (8, len(tr.parts.eval_pairs))):
        assert all(all(lo <= i < hi for i in c) or all(not lo <= i < hi for i in c) for c in grouped_chunks)
    tr.evaluator.divergence_reference.clear()
    plain = tr.evaluator.evaluate(snapshot=True)
    assert grouped.keys() == plain.keys() and grouped["div_kl"] > 0
    for key, value in plain.items():
        assert grouped[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert list(margins[0]) == list(margins[1]) == [p.pair_id for p in tr.parts.eval_pairs]
    np.testing.assert_allclose(list(margins[0].values()), list(margins[1].values()), rtol=1e-5, atol=1e-5)
    for a, b in zip(snapshots[0], snapshots[1]):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # another evaluation batch size (monitoring.eval_batch_size): other batches, the same values
    monkeypatch.setattr(tr.config.monitoring, "eval_batch_size", 7)
    assert max(map(len, tr.evaluator.eval_chunks())) == 7 != cfg.optimisation.batch_size
    tr.evaluator.divergence_reference.clear()
    wider = tr.evaluator.evaluate(snapshot=True)
    for key, value in plain.items():
        assert wider[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    np.testing.assert_allclose(list(margins[2].values()), list(margins[1].values()), rtol=1e-5, atol=1e-5)
    for a, b in zip(snapshots[2], snapshots[1]):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_packed_block_mask_allows_exactly_what_each_token_sees_alone():
    """packed_attention_mask against the rule written out position by position: a token sees earlier
    tokens of its own pair that are the prompt or its own response; padding sees itself."""
    from dpo_engine.train.data import packed_attention_mask

    pairs = [
        TokenizedPair("a", [1, 2, 3], [4, 5], [6]),
        TokenizedPair("b", [7], [8, 9, 10], [11, 12]),
        TokenizedPair("c", [13], [15], [16]),
        TokenizedPair("d", [], [19], [20]),
    ]
    batch = collate_packed(pairs, pad_token_id=0)
    mask = packed_attention_mask(batch.segment, batch.owner)
    rows, width = batch.segment.shape
    assert mask.shape == (rows, 1, width, width) and rows < len(pairs)
    seg, own = batch.segment.tolist(), batch.owner.tolist()
    for r in range(rows):
        for q in range(width):
            for k in range(width):
                sees = k == q or (k < q and own[r][k] == own[r][q] and seg[r][k] in (0, seg[r][q]))
                assert bool(mask[r, 0, q, k]) == sees, (r, q, k)


def test_a_sliding_window_shorter_than_max_length_keeps_the_plain_layout():
    from types import SimpleNamespace

    from dpo_engine.train.setup import packing_keeps_attention

    said: list[str] = []
    model = SimpleNamespace(config=SimpleNamespace(sliding_window=64))
    assert packing_keeps_attention(model, 64, said.append) and not said
    assert not packing_keeps_attention(model, 65, said.append)
    assert "sliding window of 64 tokens" in said[0]
    unused = SimpleNamespace(config=SimpleNamespace(sliding_window=16, use_sliding_window=False))  # Qwen2 style
    assert packing_keeps_attention(unused, 512, said.append)
    assert packing_keeps_attention(SimpleNamespace(config=SimpleNamespace()), 512, said.append)


def test_device_fingerprint_changes_with_any_weight_and_its_position():
    """The key of a GPU's weights (formed on the device, computed here on the CPU) sees a one-ulp
    change, two swapped values and bf16 tensors of an odd length."""
    from dpo_engine.train.reference import device_fingerprint

    torch.manual_seed(0)
    w = torch.randn(1000, 7)
    base = device_fingerprint(w).tolist()
    assert device_fingerprint(w.clone()).tolist() == base
    nudged = w.clone()
    nudged[3, 2] = torch.nextafter(nudged[3, 2], torch.tensor(1e9))
    assert device_fingerprint(nudged).tolist() != base
    swapped = w.clone()
    swapped[[0, 1]] = swapped[[1, 0]]
    fp = device_fingerprint(swapped).tolist()
    assert fp[0] == base[0] and fp[1] != base[1]  # same words, other places
    odd = torch.randn(5, dtype=torch.bfloat16)  # 10 bytes: read byte by byte
    changed = odd.clone()
    changed[4] = -changed[4]
    assert device_fingerprint(odd).tolist() != device_fingerprint(changed).tolist()
