"""Kernels against closed forms, sklearn and scipy; PSD Gram matrices; mixtures and anti-collapse."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import mahalanobis
from scipy.stats import entropy
from sklearn.covariance import LedoitWolf
from sklearn.decomposition import PCA

from dpo_engine.kernels import (
    KernelCalibration,
    KernelConfig,
    build_kernel,
    gram_log_kernel,
    random_orthogonal_projection,
)
from dpo_engine.losses import embedding_margin, hybrid_dpo_loss

DIM = 8


pytestmark = pytest.mark.usefixtures("torch_single_thread")


def unit_vectors(n: int, seed: int, dim: int = DIM, scales: torch.Tensor | None = None) -> torch.Tensor:
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return F.normalize(x if scales is None else x * scales, dim=-1)


CALIB_REPS = unit_vectors(200, seed=0, scales=torch.linspace(0.3, 2.0, DIM, dtype=torch.float64))
CALIBRATION = KernelCalibration.fit(CALIB_REPS, spectral_components=5)
KERNELS = ["rbf", "polynomial", "spectral", "mahalanobis", "mixture", "hmk"]


def make(name: str, **overrides) -> torch.nn.Module:
    kernel = build_kernel(KernelConfig(name=name, **overrides), CALIBRATION)
    assert kernel is not None
    return kernel.double()


def randomise_weights(kernel: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for theta in kernel.mixture_parameters():
            theta.copy_(torch.randn(theta.shape, generator=gen))


# --- calibration -----------------------------------------------------------------------


def test_calibration_precision_is_inverse_ledoit_wolf_covariance() -> None:
    expected = np.linalg.inv(LedoitWolf().fit(CALIB_REPS.numpy()).covariance_)
    np.testing.assert_allclose(CALIBRATION.precision.double().numpy(), expected, rtol=1e-5)


def test_spectral_directions_are_principal_components_up_to_sign() -> None:
    x = CALIB_REPS.numpy()
    sklearn_dirs = PCA(n_components=5).fit(x).components_
    eigvals, eigvecs = np.linalg.eigh(np.cov(x, rowvar=False))  # independent: covariance eigenproblem
    order = np.argsort(eigvals)[::-1][:5]
    ours = CALIBRATION.components.double().numpy()
    for reference in (sklearn_dirs, eigvecs[:, order].T):
        np.testing.assert_allclose(np.abs((ours * reference).sum(-1)), np.ones(5), atol=1e-5)
    np.testing.assert_allclose(CALIBRATION.variances.double().numpy(), eigvals[order], rtol=1e-5)
    np.testing.assert_allclose(CALIBRATION.weights.sum().item(), 1.0, rtol=1e-6)


def test_calibration_round_trips_through_a_file(tmp_path) -> None:
    path = tmp_path / "calibration.pt"
    CALIBRATION.save(path)
    loaded = KernelCalibration.load(path)
    for key, value in CALIBRATION.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    u, v = unit_vectors(4, 1), unit_vectors(4, 2)
    for name in ("spectral", "mahalanobis", "hmk"):
        a = build_kernel(KernelConfig(name=name), CALIBRATION).double()
        b = build_kernel(KernelConfig(name=name), loaded).double()
        assert torch.equal(a.log_kernel(u, v), b.log_kernel(u, v))
    restored = KernelCalibration.fit(unit_vectors(20, 9), spectral_components=2)
    restored.load_state_dict(CALIBRATION.state_dict())
    assert torch.equal(restored.precision, CALIBRATION.precision)


def test_calibration_rejects_bad_input(tmp_path) -> None:
    with pytest.raises(ValueError, match="at least 2"):
        KernelCalibration.fit(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="2-D"):
        KernelCalibration.fit(torch.zeros(5))
    with pytest.raises(ValueError, match="NaN"):
        KernelCalibration.fit(torch.full((5, 3), float("nan")))
    with pytest.raises(FileNotFoundError):
        KernelCalibration.load(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="missing"):
        KernelCalibration.from_state_dict({"precision": torch.eye(3)})


# --- single kernels against closed forms -----------------------------------------------

U, W = unit_vectors(12, 3), unit_vectors(12, 4)


def test_rbf_closed_form() -> None:
    sigma = 0.7
    expected = np.exp(-((U - W).numpy() ** 2).sum(-1) / (2 * sigma**2))
    np.testing.assert_allclose(make("rbf", sigma=sigma).log_kernel(U, W).exp().numpy(), expected, rtol=1e-12)


def test_polynomial_closed_form_and_clamp() -> None:
    c, d = 0.5, 3
    base = ((U * W).numpy().sum(-1) + c) / (1 + c)
    expected = np.maximum(base**d, 1e-6)
    np.testing.assert_allclose(
        make("polynomial", poly_c=c, poly_degree=d).log_kernel(U, W).exp().numpy(), expected, rtol=1e-12
    )
    opposite = make("polynomial", poly_c=0.5, poly_degree=3).log_kernel(U[:1], -U[:1])
    assert float(opposite) == pytest.approx(np.log(1e-6))


def test_spectral_closed_form() -> None:
    phi = CALIBRATION.components.double().numpy()
    s = CALIBRATION.variances.double().numpy()
    w = s / s.sum()
    proj = (U - W).numpy() @ phi.T
    expected = (w * np.exp(-(proj**2) / (2 * s))).sum(-1)
    np.testing.assert_allclose(make("spectral").log_kernel(U, W).exp().numpy(), expected, rtol=1e-6)


def test_mahalanobis_matches_scipy_distance() -> None:
    precision = CALIBRATION.precision.double().numpy()
    expected = np.array([-(mahalanobis(u, w, precision) ** 2) / (2 * DIM) for u, w in zip(U.numpy(), W.numpy())])
    np.testing.assert_allclose(make("mahalanobis").log_kernel(U, W).numpy(), expected, rtol=1e-10)


# --- mixtures against hand formulas ----------------------------------------------------


def base_kernel_values(u: torch.Tensor, w: torch.Tensor) -> np.ndarray:
    return np.stack(
        [
            make(name).log_kernel(u, w).exp().detach().numpy()
            for name in ("rbf", "polynomial", "spectral", "mahalanobis")
        ],
        -1,
    )


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def test_flat_mixture_is_the_weighted_sum() -> None:
    kernel = make("mixture", entropy_eta=0.03)
    randomise_weights(kernel, 5)
    lam = softmax(kernel.theta.detach().numpy())
    expected = base_kernel_values(U, W) @ lam
    np.testing.assert_allclose(kernel.log_kernel(U, W).exp().detach().numpy(), expected, rtol=1e-10)
    weights = kernel.weights()
    assert list(weights) == ["lambda_rbf", "lambda_poly", "lambda_spectral", "lambda_mahalanobis"]
    np.testing.assert_allclose(list(weights.values()), lam, rtol=1e-6)
    assert float(kernel.entropy_penalty().detach()) == pytest.approx(-0.03 * entropy(lam), rel=1e-10)
    assert len(kernel.mixture_parameters()) == 1


def test_hmk_is_the_two_level_weighted_sum() -> None:
    kernel = make("hmk", entropy_eta=0.02)
    randomise_weights(kernel, 6)
    lam_local = softmax(kernel.theta_local.detach().numpy())
    lam_global = softmax(kernel.theta_global.detach().numpy())
    tau = softmax(kernel.theta_tau.detach().numpy())
    k = base_kernel_values(U, W)
    expected = tau[0] * (k[:, :2] @ lam_local) + tau[1] * (k[:, 2:] @ lam_global)
    np.testing.assert_allclose(kernel.log_kernel(U, W).exp().detach().numpy(), expected, rtol=1e-10)
    weights = kernel.weights()
    np.testing.assert_allclose(
        [
            weights[key]
            for key in ("lambda_rbf", "lambda_poly", "lambda_spectral", "lambda_mahalanobis", "tau_local", "tau_global")
        ],
        [*lam_local, *lam_global, *tau],
        rtol=1e-6,
    )
    expected_penalty = -0.02 * (entropy(lam_local) + entropy(lam_global) + entropy(tau))
    assert float(kernel.entropy_penalty().detach()) == pytest.approx(expected_penalty, rel=1e-10)
    assert len(kernel.mixture_parameters()) == 3


def test_mixture_weights_start_equal() -> None:
    assert all(w == pytest.approx(0.25) for w in make("mixture").weights().values())
    assert all(w == pytest.approx(0.5) for w in make("hmk").weights().values())


# --- properties shared by every kernel -------------------------------------------------


@pytest.mark.parametrize("name", KERNELS)
def test_positive_normalised_and_symmetric(name: str) -> None:
    kernel = make(name)
    randomise_weights(kernel, 7)
    log_k = kernel.log_kernel(U, W)
    assert bool(torch.isfinite(log_k).all())  # K > 0
    assert bool((log_k <= 1e-12).all())
    torch.testing.assert_close(kernel.log_kernel(U, U), torch.zeros(len(U), dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(kernel.log_kernel(W, U), log_k, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", KERNELS)
def test_gram_matrix_is_positive_semidefinite(name: str) -> None:
    kernel = make(name)
    randomise_weights(kernel, 8)
    points = unit_vectors(40, 11)
    gram = gram_log_kernel(kernel, points, points).exp().detach().numpy()
    assert np.allclose(gram, gram.T, atol=1e-12)
    assert np.linalg.eigvalsh(gram).min() >= -1e-6


@pytest.mark.parametrize("degree", [1, 2, 3, 4])
def test_polynomial_gram_is_psd_for_integer_degree_and_c_at_least_one(degree: int) -> None:
    points = unit_vectors(40, 12)
    gram = gram_log_kernel(make("polynomial", poly_c=1.0, poly_degree=degree), points, points).exp().detach().numpy()
    assert np.linalg.eigvalsh(gram).min() >= -40 * 1e-6


def test_polynomial_with_small_c_and_odd_degree_is_not_psd() -> None:
    """Documents the limit in the kernels module docstring: where (u.v + c) is negative and d odd,
    the clamp replaces a negative value by 1e-6 and the Gram matrix loses PSD-ness."""
    angles = torch.linspace(0, 2 * torch.pi, 8, dtype=torch.float64)[:-1]
    points = torch.zeros(7, DIM, dtype=torch.float64)
    points[:, 0], points[:, 1] = torch.cos(angles), torch.sin(angles)
    gram = gram_log_kernel(make("polynomial", poly_c=0.0, poly_degree=1), points, points).exp().detach().numpy()
    assert np.linalg.eigvalsh(gram).min() < -0.05
    unclamped = (points @ points.T).numpy()
    assert np.linalg.eigvalsh(unclamped).min() > -1e-12


@pytest.mark.parametrize("name", KERNELS)
def test_gradcheck_float64(name: str) -> None:
    kernel = make(name)
    randomise_weights(kernel, 9)
    u = unit_vectors(3, 14).requires_grad_(True)
    v = unit_vectors(3, 15).requires_grad_(True)
    params = dict(kernel.named_parameters())

    def fn(u: torch.Tensor, v: torch.Tensor, *thetas: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(kernel, dict(zip(params, thetas)), (u, v))

    thetas = tuple(p.detach().clone().requires_grad_(True) for p in params.values())
    assert torch.autograd.gradcheck(fn, (u, v, *thetas))
    u_same = u.detach().clone().requires_grad_(True)
    kernel.log_kernel(u_same, u_same.detach()).sum().backward()
    assert bool(torch.isfinite(u_same.grad).all())


def test_single_kernels_have_no_mixture_terms() -> None:
    for name in ("rbf", "polynomial", "spectral", "mahalanobis"):
        kernel = make(name)
        assert kernel.weights() == {} and kernel.mixture_parameters() == []
        assert float(kernel.entropy_penalty().detach()) == 0.0


def test_build_kernel_errors_and_none() -> None:
    assert build_kernel(KernelConfig(name="none"), None) is None
    assert build_kernel(KernelConfig(name="rbf"), None) is not None
    for name in ("spectral", "mahalanobis", "mixture", "hmk"):
        with pytest.raises(ValueError, match="KernelCalibration"):
            build_kernel(KernelConfig(name=name), None)
    with pytest.raises(ValueError, match="same shape"):
        make("rbf").log_kernel(U, W[:, :3])
    with pytest.raises(ValueError, match="calibrated for dim"):
        make("mahalanobis").log_kernel(U[:, :3], W[:, :3])
    with pytest.raises(ValueError):
        KernelConfig(name="laplace")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        KernelConfig(sigma=0.0)


def test_random_orthogonal_projection() -> None:
    proj = random_orthogonal_projection(32, 8, seed=3)
    assert proj.shape == (32, 8)
    torch.testing.assert_close(proj.T @ proj, torch.eye(8), atol=1e-5, rtol=0)
    assert torch.equal(proj, random_orthogonal_projection(32, 8, seed=3))
    assert not torch.allclose(proj, random_orthogonal_projection(32, 8, seed=4))
    with pytest.raises(ValueError, match="up to"):
        random_orthogonal_projection(8, 32, seed=0)


# --- anti-collapse: HMK with the entropy term vs the flat mixture without it -----------


def synthetic_pairs(rejected_spread: float, n: int = 64, seed: int = 0):
    """Pairs where y- strays from x mostly along the first half of the axes; kernels that
    weight those axes more separate the pairs better (here polynomial > rbf ≈ maha > spectral)."""
    gen = torch.Generator().manual_seed(seed)
    calibration = KernelCalibration.fit(
        F.normalize(torch.randn(512, DIM, generator=gen), dim=-1), spectral_components=4
    )
    x = F.normalize(torch.randn(n, DIM, generator=gen), dim=-1)
    chosen = F.normalize(x + 0.3 * torch.randn(n, DIM, generator=gen), dim=-1)
    stray = torch.randn(n, DIM, generator=gen)
    stray[:, : DIM // 2] *= rejected_spread
    rejected = F.normalize(x + 0.3 * stray, dim=-1)
    return calibration, x, chosen, rejected


def train_mixture_weights(name: str, eta: float, pairs, steps: int = 400, lr: float = 0.05) -> list[dict[str, float]]:
    """Adam on θ alone, loss = hybrid DPO loss with only the kernel margin + the entropy term."""
    calibration, x, chosen, rejected = pairs
    kernel = build_kernel(KernelConfig(name=name, entropy_eta=eta), calibration)
    optimiser = torch.optim.Adam(kernel.mixture_parameters(), lr=lr)
    zeros = torch.zeros(len(x))
    trajectory = []
    for _ in range(steps):
        out = hybrid_dpo_loss(
            zeros, zeros, zeros, zeros, beta=0.1, gamma=0.5, label_smoothing=0.0,
            m_emb=embedding_margin(kernel, x, chosen, rejected), loss_entropy=kernel.entropy_penalty(),
        )  # fmt: skip
        optimiser.zero_grad()
        out.loss.backward()
        optimiser.step()
        trajectory.append(kernel.weights())
    return trajectory


def print_trajectory(label: str, trajectory: list[dict[str, float]]) -> None:
    for step in (0, 50, 100, 200, len(trajectory) - 1):
        print(label, step, {k: round(v, 3) for k, v in trajectory[step].items()})


def test_hmk_entropy_term_prevents_the_collapse_of_the_flat_mixture() -> None:
    pairs = synthetic_pairs(rejected_spread=2.0)
    margins = {
        name: float(embedding_margin(build_kernel(KernelConfig(name=name), pairs[0]), *pairs[1:]).mean())
        for name in ("rbf", "polynomial", "spectral", "mahalanobis")
    }
    print("mean embedding margin per kernel:", margins)
    assert max(margins, key=margins.get) == "polynomial" and margins["polynomial"] > 2 * margins["spectral"]

    flat = train_mixture_weights("mixture", eta=0.0, pairs=pairs)
    hmk = train_mixture_weights("hmk", eta=0.01, pairs=pairs)
    print_trajectory("flat, no entropy:", flat)
    print_trajectory("hmk, eta 0.01:", hmk)
    assert max(flat[-1].values()) > 0.9
    assert max(flat[-1], key=flat[-1].get) == "lambda_poly"
    assert min(min(weights.values()) for weights in hmk) > 0.05


def test_entropy_weight_needed_grows_with_the_advantage_of_one_kernel() -> None:
    """With one kernel far ahead, eta = 0.01 no longer holds τ above 0.05, a larger eta does."""
    pairs = synthetic_pairs(rejected_spread=3.0)
    weak = train_mixture_weights("hmk", eta=0.01, pairs=pairs)
    strong = train_mixture_weights("hmk", eta=0.05, pairs=pairs)
    print_trajectory("hmk, eta 0.01:", weak)
    print_trajectory("hmk, eta 0.05:", strong)
    assert min(weak[-1].values()) < 0.05
    assert min(min(weights.values()) for weights in strong) > 0.05


def test_half_precision_inputs_are_evaluated_in_float32() -> None:
    kernel = build_kernel(KernelConfig(name="hmk"), CALIBRATION)
    u, v = unit_vectors(4, 30), unit_vectors(4, 31)
    low = kernel.log_kernel(u.bfloat16(), v.bfloat16())
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, kernel.log_kernel(u.bfloat16().float(), v.bfloat16().float()))
