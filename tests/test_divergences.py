"""Divergences against scipy and closed forms; token-level masking, chunking and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.special import logsumexp, rel_entr
from scipy.stats import wasserstein_distance

from dpo_engine.divergences import (
    ALL_DIVERGENCES,
    DivergenceConfig,
    all_token_divergences,
    bhattacharyya,
    f_divergence,
    hellinger,
    js,
    kl,
    renyi,
    token_divergence,
    wasserstein_sinkhorn,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def random_dists(rows: int, vocab: int, seed: int, spread: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = np.exp(spread * rng.normal(size=(rows, vocab)))
    q = np.exp(spread * rng.normal(size=(rows, vocab)))
    return p / p.sum(-1, keepdims=True), q / q.sum(-1, keepdims=True)


def logs(*arrays: np.ndarray) -> list[torch.Tensor]:
    return [torch.from_numpy(np.log(a)) for a in arrays]


P, Q = random_dists(6, 9, seed=1)
LOGP, LOGQ = logs(P, Q)


def test_kl_matches_scipy_rel_entr() -> None:
    np.testing.assert_allclose(kl(LOGP, LOGQ).numpy(), rel_entr(P, Q).sum(-1), rtol=1e-12)


def test_js_matches_scipy_jensenshannon_squared() -> None:
    expected = np.array([jensenshannon(p, q, base=np.e) ** 2 for p, q in zip(P, Q)])
    np.testing.assert_allclose(js(LOGP, LOGQ).numpy(), expected, rtol=1e-10)


def test_hellinger_closed_form() -> None:
    expected = np.sqrt(0.5 * ((np.sqrt(P) - np.sqrt(Q)) ** 2).sum(-1))
    np.testing.assert_allclose(hellinger(LOGP, LOGQ).numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("order", [2.0, 0.5])
def test_renyi_closed_form(order: float) -> None:
    expected = np.log((P**order * Q ** (1 - order)).sum(-1)) / (order - 1)
    np.testing.assert_allclose(renyi(LOGP, LOGQ, order).numpy(), expected, rtol=1e-12)


def test_renyi_order_one_is_kl_and_nearby_orders_approach_it() -> None:
    np.testing.assert_allclose(renyi(LOGP, LOGQ, 1.0).numpy(), rel_entr(P, Q).sum(-1), rtol=1e-12)
    np.testing.assert_allclose(renyi(LOGP, LOGQ, 1.0 + 1e-6).numpy(), rel_entr(P, Q).sum(-1), rtol=1e-4)


def test_bhattacharyya_closed_form() -> None:
    np.testing.assert_allclose(bhattacharyya(LOGP, LOGQ).numpy(), -np.log(np.sqrt(P * Q).sum(-1)), rtol=1e-12)


def test_f_divergences_closed_forms() -> None:
    jeffreys = rel_entr(P, Q).sum(-1) + rel_entr(Q, P).sum(-1)
    np.testing.assert_allclose(f_divergence(LOGP, LOGQ, "jeffreys").numpy(), jeffreys, rtol=1e-12)
    np.testing.assert_allclose(f_divergence(LOGP, LOGQ, "chi2").numpy(), ((P - Q) ** 2 / Q).sum(-1), rtol=1e-12)
    np.testing.assert_allclose(
        f_divergence(LOGP, LOGQ, "total_variation").numpy(), 0.5 * np.abs(P - Q).sum(-1), rtol=1e-12
    )
    a = 0.3
    alpha_div = ((P**a * Q ** (1 - a)).sum(-1) - 1) / (a * (a - 1))
    np.testing.assert_allclose(f_divergence(LOGP, LOGQ, "alpha", a).numpy(), alpha_div, rtol=1e-10)
    # The alpha family's limits are the two KL directions.
    np.testing.assert_allclose(f_divergence(LOGP, LOGQ, "alpha", 1 - 1e-7).numpy(), rel_entr(P, Q).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(f_divergence(LOGP, LOGQ, "alpha", 1e-7).numpy(), rel_entr(Q, P).sum(-1), rtol=1e-5)


def test_unknown_f_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown f-divergence"):
        f_divergence(LOGP, LOGQ, "cosh")  # type: ignore[arg-type]


# --- Wasserstein -----------------------------------------------------------------------


def line_embeddings(n: int) -> np.ndarray:
    """Unit vectors with 1 - cos(E_i, E_j) = |i - j| / (n - 1): 1 - |x - y| = min(x, y) + min(1-x, 1-y)."""
    steps = np.arange(1, n)
    below = (steps[None, :] <= np.arange(n)[:, None]).astype(float)
    return np.concatenate([below, 1.0 - below], axis=1) / np.sqrt(n - 1)


def reference_entropic_ot(a: np.ndarray, b: np.ndarray, cost: np.ndarray, eps: float, iters: int) -> float:
    """Plain numpy log-domain Sinkhorn on the points that carry mass (zero-mass points dropped)."""
    ia, ib = a > 0, b > 0
    a, b, cost = a[ia], b[ib], cost[np.ix_(ia, ib)]
    f, g = np.zeros(len(a)), np.zeros(len(b))
    for _ in range(iters):
        f = -eps * logsumexp(np.log(b)[None, :] + (g[None, :] - cost) / eps, axis=1)
        g = -eps * logsumexp(np.log(a)[:, None] + (f[:, None] - cost) / eps, axis=0)
    return float(a @ f + b @ g)


def reference_sinkhorn_divergence(a: np.ndarray, b: np.ndarray, cost: np.ndarray, eps: float, iters: int) -> float:
    return (
        reference_entropic_ot(a, b, cost, eps, iters)
        - 0.5 * reference_entropic_ot(a, a, cost, eps, iters)
        - 0.5 * reference_entropic_ot(b, b, cost, eps, iters)
    )


def cosine_cost(emb: np.ndarray) -> np.ndarray:
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    return np.clip(1.0 - unit @ unit.T, 0.0, None)


def test_line_embedding_gives_the_one_dimensional_metric() -> None:
    n = 7
    expected = np.abs(np.arange(n)[:, None] - np.arange(n)[None, :]) / (n - 1)
    np.testing.assert_allclose(cosine_cost(line_embeddings(n)), expected, atol=1e-12)


def test_wasserstein_approaches_scipy_w1_as_epsilon_shrinks() -> None:
    n = 8
    p, q = random_dists(3, n, seed=5)
    emb = torch.from_numpy(line_embeddings(n))
    support = np.arange(n) / (n - 1)
    exact = np.array([wasserstein_distance(support, support, pi, qi) for pi, qi in zip(p, q)])
    errors = []
    for eps in (0.1, 0.03, 0.01, 0.003):
        value = wasserstein_sinkhorn(*logs(p, q), emb, top_k=n, epsilon=eps, iterations=1200).numpy()
        errors.append(np.abs(value - exact).max())
    print("max |S_eps - W1| for eps 0.1, 0.03, 0.01, 0.003:", errors)
    assert all(later < earlier for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < 0.005  # W1 values here are 0.11-0.34


def test_wasserstein_with_full_support_equals_full_entropic_ot() -> None:
    vocab = 10
    p, q = random_dists(4, vocab, seed=7)
    emb = np.random.default_rng(3).normal(size=(vocab, 5))
    eps, iters = 0.2, 400
    ours = wasserstein_sinkhorn(*logs(p, q), torch.from_numpy(emb), top_k=vocab + 5, epsilon=eps, iterations=iters)
    expected = [reference_sinkhorn_divergence(pi, qi, cosine_cost(emb), eps, iters) for pi, qi in zip(p, q)]
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-9, atol=1e-12)


def test_wasserstein_top_k_support_and_remaining_mass_bucket() -> None:
    vocab, top_k = 12, 3
    p, q = random_dists(5, vocab, seed=11)
    emb = np.random.default_rng(4).normal(size=(vocab, 6))
    eps, iters = 0.2, 400
    ours = wasserstein_sinkhorn(*logs(p, q), torch.from_numpy(emb), top_k=top_k, epsilon=eps, iterations=iters).numpy()
    full_cost = cosine_cost(emb)
    for row, (pi, qi) in enumerate(zip(p, q)):
        tokens = sorted(set(np.argsort(-pi)[:top_k]) | set(np.argsort(-qi)[:top_k]))
        assert len(tokens) < vocab
        a = np.append(pi[tokens], 1.0 - pi[tokens].sum())
        b = np.append(qi[tokens], 1.0 - qi[tokens].sum())
        cost = np.ones((len(tokens) + 1, len(tokens) + 1))
        cost[:-1, :-1] = full_cost[np.ix_(tokens, tokens)]
        cost[-1, -1] = 0.0
        np.testing.assert_allclose(ours[row], reference_sinkhorn_divergence(a, b, cost, eps, iters), rtol=1e-9)


def test_wasserstein_gradient_matches_finite_differences() -> None:
    vocab = 6
    emb = torch.randn(vocab, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    z = torch.randn(2, vocab, dtype=torch.float64, requires_grad=True)
    zr = torch.randn(2, vocab, dtype=torch.float64, requires_grad=True)

    def fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return wasserstein_sinkhorn(
            torch.log_softmax(a, -1), torch.log_softmax(b, -1), emb, top_k=vocab, epsilon=0.5, iterations=300
        )

    assert torch.autograd.gradcheck(fn, (z, zr), atol=1e-6)


# --- shared properties -----------------------------------------------------------------

DIST_FUNCTIONS = {
    "kl": kl,
    "js": js,
    "hellinger": hellinger,
    "renyi2": lambda a, b: renyi(a, b, 2.0),
    "renyi_half": lambda a, b: renyi(a, b, 0.5),
    "bhattacharyya": bhattacharyya,
    "jeffreys": lambda a, b: f_divergence(a, b, "jeffreys"),
    "chi2": lambda a, b: f_divergence(a, b, "chi2"),
    "total_variation": lambda a, b: f_divergence(a, b, "total_variation"),
    "alpha": lambda a, b: f_divergence(a, b, "alpha", 0.5),
    "wasserstein": lambda a, b: wasserstein_sinkhorn(
        a, b, torch.randn(a.shape[-1], 4, dtype=a.dtype, generator=torch.Generator().manual_seed(2)), 3, 0.5, 200
    ),
}


@pytest.mark.parametrize("name", list(DIST_FUNCTIONS))
def test_zero_at_equal_distributions_and_positive_otherwise(name: str) -> None:
    fn = DIST_FUNCTIONS[name]
    assert torch.allclose(fn(LOGP, LOGP), torch.zeros(len(P), dtype=torch.float64), atol=1e-12)
    assert bool((fn(LOGP, LOGQ) > 1e-6).all())


@pytest.mark.parametrize("name", list(DIST_FUNCTIONS))
def test_gradcheck_float64(name: str) -> None:
    fn = DIST_FUNCTIONS[name]
    z = torch.randn(3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(9), requires_grad=True)
    zr = torch.randn(3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    assert torch.autograd.gradcheck(lambda a: fn(torch.log_softmax(a, -1), torch.log_softmax(zr, -1)), (z,), atol=1e-6)


@pytest.mark.parametrize("name", ["hellinger", "wasserstein", "kl"])
def test_gradient_is_finite_when_policy_equals_reference(name: str) -> None:
    z = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 4, dtype=torch.bool)
    value = token_divergence(
        name, z, z.detach().clone(), mask, output_embeddings=torch.randn(7, 3, dtype=torch.float64)
    )
    value.backward()
    assert float(value.detach()) == pytest.approx(0.0, abs=1e-12)
    assert bool(torch.isfinite(z.grad).all()) and float(z.grad.abs().max()) < 1e-8


# --- token level -----------------------------------------------------------------------

B, T, V = 3, 5, 8
EMB = torch.randn(V, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(21))
MASK = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)


def make_logits(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, V, dtype=torch.float64, generator=gen), torch.randn(
        B, T, V, dtype=torch.float64, generator=gen
    )


def small_cfg(name: str, chunk: int = 256) -> DivergenceConfig:
    return DivergenceConfig(name=name, chunk_positions=chunk, ot_top_k=3, ot_epsilon=0.5, ot_iterations=200)


def test_token_kl_is_mean_of_scipy_kl_over_masked_positions() -> None:
    policy, ref = make_logits(0)
    p = torch.softmax(policy, -1).numpy()[MASK.numpy()]
    q = torch.softmax(ref, -1).numpy()[MASK.numpy()]
    expected = rel_entr(p, q).sum(-1).mean()
    assert float(token_divergence("kl", policy, ref, MASK)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name", ALL_DIVERGENCES)
def test_token_divergence_ignores_padding_and_chunk_size(name: str) -> None:
    policy, ref = make_logits(1)
    values, grads = [], []
    for chunk in (1, 3, 4, 1000):
        leaf = policy.clone().requires_grad_(True)
        value = token_divergence(small_cfg(name, chunk), leaf, ref, MASK, output_embeddings=EMB)
        value.backward()
        values.append(float(value.detach()))
        grads.append(leaf.grad)
    assert max(values) - min(values) < 1e-12
    for grad in grads[1:]:
        torch.testing.assert_close(grad, grads[0], rtol=1e-10, atol=1e-14)
    # padding positions get no gradient, and changing their logits changes nothing
    assert float(grads[0][~MASK].abs().max()) == 0.0
    assert float(grads[0][MASK].abs().max()) > 0.0
    noisy_policy, noisy_ref = policy.clone(), ref.clone()
    noisy_policy[~MASK] += 5 * torch.randn_like(noisy_policy[~MASK])
    noisy_ref[~MASK] -= 3.0
    moved = token_divergence(small_cfg(name), noisy_policy, noisy_ref, MASK, output_embeddings=EMB)
    assert float(moved) == pytest.approx(values[0], rel=1e-12)


@pytest.mark.parametrize("name", ALL_DIVERGENCES)
def test_token_divergence_gradcheck_and_reference_gets_no_gradient(name: str) -> None:
    policy, ref = make_logits(2)
    cfg = small_cfg(name, chunk=4).model_copy(update={"ot_iterations": 400})
    if name == "wasserstein":
        cfg = cfg.model_copy(update={"ot_top_k": V})  # gradcheck's perturbations must not change the support
    leaf = policy.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda z: token_divergence(cfg, z, ref, MASK, output_embeddings=EMB), (leaf,), atol=1e-6, fast_mode=True
    )
    ref_leaf = ref.clone().requires_grad_(True)
    token_divergence(cfg, leaf, ref_leaf, MASK, output_embeddings=EMB).backward()
    assert ref_leaf.grad is None


def test_all_token_divergences_match_individual_calls() -> None:
    policy, ref = make_logits(3)
    cfg = small_cfg("kl", chunk=4)
    logged = all_token_divergences(policy, ref, MASK, cfg, EMB)
    assert list(logged) == [f"div_{name}" for name in ALL_DIVERGENCES]
    for name in ALL_DIVERGENCES:
        single = token_divergence(name, policy, ref, MASK, output_embeddings=EMB, cfg=cfg)
        assert logged[f"div_{name}"] == pytest.approx(float(single), rel=1e-12)


def test_low_precision_logits_are_computed_in_float32() -> None:
    policy, ref = make_logits(4)
    value = token_divergence("js", policy.bfloat16(), ref.bfloat16(), MASK)
    assert value.dtype == torch.float32
    assert float(value) == pytest.approx(
        float(token_divergence("js", policy.bfloat16().double(), ref.bfloat16().double(), MASK)), rel=1e-4
    )


def test_none_is_zero() -> None:
    policy, ref = make_logits(5)
    assert float(token_divergence("none", policy, ref, MASK)) == 0.0


def test_bad_inputs_raise_clear_errors() -> None:
    policy, ref = make_logits(6)
    with pytest.raises(ValueError, match="differ in shape"):
        token_divergence("kl", policy, ref[:, :-1], MASK)
    with pytest.raises(ValueError, match="mask must be"):
        token_divergence("kl", policy, ref, MASK[:, :-1])
    with pytest.raises(ValueError, match="no positions"):
        token_divergence("kl", policy, ref, torch.zeros_like(MASK))
    with pytest.raises(ValueError, match="output_embeddings"):
        token_divergence("wasserstein", policy, ref, MASK)
    with pytest.raises(ValueError, match="V = 8"):
        token_divergence("wasserstein", policy, ref, MASK, output_embeddings=EMB[:-1])
    with pytest.raises(ValueError):
        token_divergence("cosine", policy, ref, MASK)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="order"):
        renyi(LOGP, LOGQ, -1.0)


def test_sliced_logits_are_read_in_place() -> None:
    """Callers pass logits[:, :-1] (shifted, non-contiguous); the result and gradient are unchanged."""
    policy, ref = make_logits(7)
    wide = torch.cat([policy, torch.randn(B, 1, V, dtype=torch.float64)], dim=1).requires_grad_(True)
    sliced = wide[:, :-1]
    assert not sliced.is_contiguous()
    value = token_divergence("js", sliced, ref, MASK)
    value.backward()
    leaf = policy.clone().requires_grad_(True)
    expected = token_divergence("js", leaf, ref, MASK)
    expected.backward()
    assert float(value.detach()) == pytest.approx(float(expected.detach()), rel=1e-14)
    torch.testing.assert_close(wide.grad[:, :-1], leaf.grad)
    assert float(wide.grad[:, -1].abs().max()) == 0.0


TOKEN_CONFIGS = [
    DivergenceConfig(name="kl"),
    DivergenceConfig(name="js"),
    DivergenceConfig(name="hellinger"),
    DivergenceConfig(name="renyi", renyi_order=2.0),
    DivergenceConfig(name="renyi", renyi_order=0.5),
    DivergenceConfig(name="renyi", renyi_order=1.0),
    DivergenceConfig(name="bhattacharyya"),
    *(DivergenceConfig(name="fdiv", f=f) for f in ("jeffreys", "chi2", "total_variation")),
    *(DivergenceConfig(name="fdiv", f="alpha", f_alpha=a) for a in (0.5, -0.5, 2.0, 1.0, 0.0)),
]


@pytest.mark.parametrize("cfg", TOKEN_CONFIGS, ids=lambda c: f"{c.name}-{c.renyi_order}-{c.f}-{c.f_alpha}")
def test_token_gradient_equals_autograd_of_the_distribution_function(cfg: DivergenceConfig) -> None:
    """The token path's hand-derived gradients against autograd through the plain formulas."""
    from dpo_engine.divergences import _pointwise

    policy, ref = make_logits(8)
    leaf = policy.clone().requires_grad_(True)
    token_divergence(cfg.model_copy(update={"chunk_positions": 3}), leaf, ref, MASK).backward()
    auto = policy.clone().requires_grad_(True)
    per_position = _pointwise(cfg, cfg.name)(torch.log_softmax(auto, -1), torch.log_softmax(ref, -1))
    per_position[MASK].mean().backward()
    torch.testing.assert_close(leaf.grad, auto.grad, rtol=1e-10, atol=1e-13)
