"""Hybrid DPO loss against hand-written DPO / conservative DPO; log-probs; ε-DPO by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import expit, log_softmax

from dpo_engine.kernels import KernelConfig, build_kernel
from dpo_engine.losses import (
    LossConfig,
    embedding_margin,
    epsilon_dpo_beta_per_pair,
    epsilon_dpo_steps,
    hybrid_dpo_loss,
    masked_mean_pool,
    sequence_logps,
    update_beta,
)


def random_logps(n: int, seed: int, dtype=torch.float64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [-20 * torch.rand(n, generator=gen, dtype=dtype) for _ in range(4)]


def dpo_by_hand(pc, pr, rc, rr, beta, ls=0.0) -> float:
    """Rafailov et al.'s loss (and conservative DPO for ls > 0), in numpy."""
    logits = beta * ((pc - rc) - (pr - rr))
    return float(np.mean(-(1 - ls) * np.log(expit(logits)) - ls * np.log(expit(-logits))))


def test_reduces_to_standard_dpo_to_float_precision() -> None:
    pc, pr, rc, rr = random_logps(16, seed=0)
    out = hybrid_dpo_loss(pc, pr, rc, rr, beta=0.1, m_emb=None, gamma=0.0, label_smoothing=0.0)
    expected = dpo_by_hand(*(t.numpy() for t in (pc, pr, rc, rr)), beta=0.1)
    assert float(out.loss) == pytest.approx(expected, rel=1e-14)
    assert float(out.loss_pref) == float(out.loss)
    assert float(out.loss_div) == 0.0 and float(out.loss_entropy) == 0.0
    np.testing.assert_allclose(out.reward_chosen.numpy(), 0.1 * (pc - rc).numpy(), rtol=1e-14)
    np.testing.assert_allclose(out.reward_rejected.numpy(), 0.1 * (pr - rr).numpy(), rtol=1e-14)
    np.testing.assert_allclose(out.margins.numpy(), out.reward_chosen.numpy() - out.reward_rejected.numpy(), rtol=1e-12)


def test_float32_agrees_with_float64_reference() -> None:
    logps = random_logps(32, seed=1, dtype=torch.float32)
    out = hybrid_dpo_loss(*logps, beta=0.5, m_emb=None, gamma=0.0, label_smoothing=0.0)
    assert float(out.loss) == pytest.approx(dpo_by_hand(*(t.double().numpy() for t in logps), beta=0.5), rel=1e-6)


def test_label_smoothing_is_conservative_dpo() -> None:
    pc, pr, rc, rr = random_logps(16, seed=2)
    out = hybrid_dpo_loss(pc, pr, rc, rr, beta=0.2, m_emb=None, gamma=0.0, label_smoothing=0.1)
    expected = dpo_by_hand(*(t.numpy() for t in (pc, pr, rc, rr)), beta=0.2, ls=0.1)
    assert float(out.loss) == pytest.approx(expected, rel=1e-13)


def test_policy_equal_to_reference_gives_log_two() -> None:
    pc, pr, _, _ = random_logps(8, seed=3)
    for ls in (0.0, 0.2):
        out = hybrid_dpo_loss(pc, pr, pc, pr, beta=0.1, m_emb=None, gamma=0.0, label_smoothing=ls)
        assert float(out.loss) == pytest.approx(math.log(2.0), rel=1e-15)
        assert float(out.rho.abs().max()) == 0.0


def test_kernel_margin_divergence_and_entropy_terms_add_up() -> None:
    pc, pr, rc, rr = random_logps(8, seed=4)
    m_emb = torch.randn(8, dtype=torch.float64)
    beta_i = torch.linspace(0.05, 0.2, 8, dtype=torch.float64)
    out = hybrid_dpo_loss(
        pc, pr, rc, rr, beta=beta_i, m_emb=m_emb, gamma=0.5, label_smoothing=0.0,
        loss_div=torch.tensor(0.3, dtype=torch.float64), alpha=0.1,
        loss_entropy=torch.tensor(-0.02, dtype=torch.float64),
    )  # fmt: skip
    margins = beta_i.numpy() * ((pc - rc) - (pr - rr)).numpy() + 0.5 * m_emb.numpy()
    pref = float(np.mean(np.logaddexp(0.0, -margins)))
    assert float(out.loss_pref) == pytest.approx(pref, rel=1e-13)
    assert float(out.loss) == pytest.approx(pref + 0.1 * 0.3 - 0.02, rel=1e-13)
    np.testing.assert_allclose(out.margins.numpy(), margins, rtol=1e-13)
    np.testing.assert_allclose(out.beta_i.numpy(), beta_i.numpy())


def test_loss_gradcheck_float64() -> None:
    inputs = [t.requires_grad_(True) for t in random_logps(5, seed=5)]
    m_emb = torch.randn(5, dtype=torch.float64, requires_grad=True)
    loss_div = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)

    def fn(pc, pr, rc, rr, m, div):
        return hybrid_dpo_loss(
            pc, pr, rc, rr, beta=0.3, m_emb=m, gamma=0.5, label_smoothing=0.1, loss_div=div, alpha=0.1
        ).loss

    assert torch.autograd.gradcheck(fn, (*inputs, m_emb, loss_div))


def test_loss_rejects_bad_input() -> None:
    pc, pr, rc, rr = random_logps(4, seed=6)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        hybrid_dpo_loss(pc, pr[:3], rc, rr, beta=0.1, m_emb=None, gamma=0.0, label_smoothing=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        hybrid_dpo_loss(pc, pr, rc, rr, beta=0.1, m_emb=None, gamma=0.0, label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta"):
        hybrid_dpo_loss(pc, pr, rc, rr, beta=0.0, m_emb=None, gamma=0.0, label_smoothing=0.0)
    with pytest.raises(ValueError, match="m_emb"):
        hybrid_dpo_loss(pc, pr, rc, rr, beta=0.1, m_emb=torch.zeros(3), gamma=0.5, label_smoothing=0.0)
    with pytest.raises(ValueError):
        LossConfig(label_smoothing=0.7)
    assert LossConfig().model_dump() == {"beta": 0.1, "gamma": 0.5, "label_smoothing": 0.0, "epsilon_dpo": 0.0}


# --- log-probabilities and pooling -----------------------------------------------------


def test_sequence_logps_against_scipy_log_softmax() -> None:
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 6, 11, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 6), generator=gen)
    mask = torch.rand(3, 6, generator=gen) > 0.4
    labels[~mask] = -100  # ignored positions may carry any label
    logp = log_softmax(logits.numpy(), axis=-1)
    expected = [sum(logp[b, t, labels[b, t]] for t in range(6) if mask[b, t]) for b in range(3)]
    np.testing.assert_allclose(sequence_logps(logits, labels, mask).numpy(), expected, rtol=1e-12)
    leaf = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: sequence_logps(z, labels, mask), (leaf,))


def test_sequence_logps_rejects_bad_labels_and_shapes() -> None:
    logits = torch.randn(2, 3, 5)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        sequence_logps(logits, torch.full((2, 3), 5), mask)
    with pytest.raises(ValueError, match="B x T"):
        sequence_logps(logits, torch.zeros(2, 4, dtype=torch.long), mask)


def test_masked_mean_pool() -> None:
    hidden = torch.randn(2, 4, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]], dtype=torch.bool)
    pooled = masked_mean_pool(hidden, mask)
    h = hidden.numpy()
    expected = np.stack([h[0, :2].mean(0), h[1, 1:].mean(0)])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(pooled.numpy(), expected, rtol=1e-12)
    empty = masked_mean_pool(hidden, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool))
    np.testing.assert_allclose(empty[0].numpy(), h[0, 0] / np.linalg.norm(h[0, 0]), rtol=1e-12)
    assert not empty[1].any()  # no tokens: the zero vector, not an error mid-run


def test_embedding_margin_is_difference_of_log_kernels() -> None:
    kernel = build_kernel(KernelConfig(name="rbf", sigma=0.5), None)
    x, yc, yr = (F.normalize(torch.randn(4, 6, dtype=torch.float64), dim=-1) for _ in range(3))
    expected = (-((x - yc) ** 2).sum(-1) + ((x - yr) ** 2).sum(-1)) / (2 * 0.25)
    torch.testing.assert_close(embedding_margin(kernel, x, yc, yr), expected)


# --- ε-DPO -----------------------------------------------------------------------------

EPS = 0.01


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def crafted_batch():
    """Four pairs, T = 2, V = 2. Perturbed logits are z + t (z - z_ref) with t in {-ε, 0, ε}.

    chosen, with d = z - z_ref = [1, -1] and z = 0 (so logits [t, -t]):
      pair 0: label 0 at one position   -> l = log σ(2t), increasing      -> step +1
      pair 1: label 1 at one position   -> l = log σ(-2t), decreasing     -> step -1
      pair 2: labels 0 then 1           -> l = log σ(2t) + log σ(-2t), peak at t = 0 -> step 0
      pair 3: as pair 0                                                     -> step +1
    rejected: z = z_ref, so l(y-) does not depend on t.
    """
    d = torch.tensor([1.0, -1.0])
    policy_c = torch.zeros(4, 2, 2)
    ref_c = -d.expand(4, 2, 2).clone()
    labels_c = torch.tensor([[0, 0], [1, 0], [0, 1], [0, 0]])
    mask_c = torch.tensor([[1, 0], [1, 0], [1, 1], [1, 0]], dtype=torch.bool)
    policy_c[~mask_c] = torch.tensor([7.0, -3.0])  # padding: must not matter
    gen = torch.Generator().manual_seed(0)
    policy_r = torch.randn(4, 2, 2, generator=gen)
    ref_r = policy_r.clone()
    labels_r = torch.randint(0, 2, (4, 2), generator=gen)
    mask_r = torch.ones(4, 2, dtype=torch.bool)
    return policy_c, ref_c, labels_c, mask_c, policy_r, ref_r, labels_r, mask_r


def hand_ratio(pair: int, t: float) -> float:
    chosen = {
        0: log_sigmoid(2 * t),
        1: log_sigmoid(-2 * t),
        2: log_sigmoid(2 * t) + log_sigmoid(-2 * t),
        3: log_sigmoid(2 * t),
    }
    return chosen[pair]  # the rejected term is the same constant for every t


def test_epsilon_dpo_steps_match_hand_computation() -> None:
    expected = []
    for pair in range(4):
        minus, mid, plus = (hand_ratio(pair, t) for t in (-EPS, 0.0, EPS))
        expected.append(1 if plus > mid > minus else -1 if minus > mid > plus else 0)
    assert expected == [1, -1, 0, 1]
    steps = epsilon_dpo_steps(*crafted_batch(), epsilon=EPS)
    assert steps.tolist() == expected


def test_epsilon_dpo_beta_per_pair_and_update_by_hand() -> None:
    steps = epsilon_dpo_steps(*crafted_batch(), epsilon=EPS)
    beta_i = epsilon_dpo_beta_per_pair(0.1, steps, EPS)
    np.testing.assert_allclose(beta_i.numpy(), [0.1 / 1.01, 0.1 / 0.99, 0.1, 0.1 / 1.01], rtol=1e-6)
    mean_step = float(steps.float().mean())
    assert mean_step == 0.25
    assert update_beta(0.1, mean_step, EPS) == pytest.approx(0.1 / 1.0025, rel=1e-15)
    assert update_beta(0.1, 0.0, EPS) == 0.1
    with pytest.raises(ValueError, match="epsilon"):
        epsilon_dpo_steps(*crafted_batch(), epsilon=0.0)
    with pytest.raises(ValueError, match="mean_step"):
        update_beta(0.1, 2.0, EPS)


def test_epsilon_dpo_is_zero_when_policy_equals_reference() -> None:
    policy_c, _, labels_c, mask_c, policy_r, _, labels_r, mask_r = crafted_batch()
    steps = epsilon_dpo_steps(policy_c, policy_c, labels_c, mask_c, policy_r, policy_r, labels_r, mask_r, epsilon=EPS)
    assert steps.tolist() == [0, 0, 0, 0]
