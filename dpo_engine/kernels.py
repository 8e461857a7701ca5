"""Kernels on representation vectors and their learnable mixtures (METHOD.md 2.3-2.4).

Every kernel is evaluated in log space: the loss only needs log K, mixtures are
combined with logsumexp, and nothing underflows when two vectors are far apart.
All kernels satisfy K(u, u) = 1, so log K(u, u) = 0 and log K <= 0.

Positive semi-definiteness (checked in tests on random Gram matrices):
- rbf, mahalanobis: Gaussian kernels under a positive-definite metric, PSD.
- spectral: a positive combination of 1-D Gaussian kernels on projections, PSD.
- polynomial ((u.v + c) / (1 + c))^d with integer d >= 1 and c >= 0 is a product
  and sum of PSD kernels, hence PSD. The clamp at 1e-6 only raises entries that are
  below 1e-6; on unit vectors with c >= 1 the unclamped value is already >= 0, so the
  clamp perturbs the Gram matrix by a non-negative matrix with entries <= 1e-6 and
  moves eigenvalues by at most n * 1e-6. With c < 1 and odd d the unclamped kernel
  can be negative and the clamped one need not be PSD.
- mixture, hmk: positive combinations of the above, PSD.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from dpo_engine.names import MIXTURE_BASE_KERNELS, MIXTURE_WEIGHTS

KernelName = Literal["none", "rbf", "polynomial", "spectral", "mahalanobis", "mixture", "hmk"]

POLY_CLAMP = 1e-6
"""Lower clamp of the polynomial kernel value, so that log K exists everywhere."""

_VARIANCE_FLOOR = 1e-12
"""Smallest spectral variance s_j used in a denominator (zero-variance directions)."""


class KernelConfig(BaseModel):
    """Kernel term settings (METHOD.md 2.3-2.4)."""

    model_config = ConfigDict(extra="forbid")

    name: KernelName = Field(
        "hmk",
        description="Kernel on representations: none, rbf, polynomial, spectral, mahalanobis, mixture (flat) or hmk "
        "(hierarchical mixture).",
    )
    sigma: float = Field(1.0, gt=0.0, description="RBF bandwidth: log K = -||u - v||^2 / (2 sigma^2).")
    poly_c: float = Field(1.0, ge=0.0, description="Polynomial offset c in ((u.v + c) / (1 + c))^d.")
    poly_degree: int = Field(2, ge=1, description="Polynomial degree d.")
    spectral_components: int = Field(
        16, ge=1, description="Principal directions of the calibration set used by the spectral kernel."
    )
    entropy_eta: float = Field(
        0.01, ge=0.0, description="Weight of the entropy anti-collapse term on mixture weights (0 = off)."
    )
    weight_lr: float = Field(1e-2, gt=0.0, description="Learning rate of the mixture weights (lambda, tau).")


def _as_float_matrix(reps: Tensor | np.ndarray, what: str) -> np.ndarray:
    arr = reps.detach().cpu().double().numpy() if isinstance(reps, Tensor) else np.asarray(reps, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a 2-D (n x k) array, got shape {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    return arr


class KernelCalibration:
    """Statistics of a calibration set that the spectral and Mahalanobis kernels need.

    Computed once from reference-model representations and stored with the run, so
    that a resumed run uses exactly the same kernels.
    """

    _KEYS = ("components", "variances", "weights", "precision")

    def __init__(self, components: Tensor, variances: Tensor, weights: Tensor, precision: Tensor) -> None:
        p, k = components.shape
        if variances.shape != (p,) or weights.shape != (p,):
            raise ValueError(
                f"variances and weights must have shape ({p},), got {tuple(variances.shape)}, {tuple(weights.shape)}"
            )
        if precision.shape != (k, k):
            raise ValueError(f"precision must have shape ({k}, {k}), got {tuple(precision.shape)}")
        self.components = components.float()  # φ, p × k, orthonormal rows
        self.variances = variances.float()  # s, p
        self.weights = weights.float()  # w = s / sum(s), p
        self.precision = precision.float()  # Σ^-1, k × k

    @property
    def dim(self) -> int:
        return int(self.components.shape[1])

    @classmethod
    def fit(cls, reps: Tensor | np.ndarray, spectral_components: int = 16) -> KernelCalibration:
        """Fit PCA directions (spectral kernel) and the Ledoit-Wolf precision (Mahalanobis)."""
        from sklearn.covariance import LedoitWolf  # here, not at import: runs without a calibrated kernel skip sklearn
        from sklearn.decomposition import PCA

        x = _as_float_matrix(reps, "calibration representations")
        n, k = x.shape
        if n < 2:
            raise ValueError(f"calibration needs at least 2 representations, got {n}")
        if spectral_components < 1:
            raise ValueError(f"spectral_components must be >= 1, got {spectral_components}")
        p = min(spectral_components, n - 1, k)
        pca = PCA(n_components=p, svd_solver="full").fit(x)
        variances = np.maximum(pca.explained_variance_, _VARIANCE_FLOOR)
        weights = variances / variances.sum()
        covariance = LedoitWolf().fit(x).covariance_
        precision = np.linalg.inv(covariance)
        return cls(
            components=torch.from_numpy(pca.components_.copy()),
            variances=torch.from_numpy(variances),
            weights=torch.from_numpy(weights),
            precision=torch.from_numpy(precision),
        )

    def state_dict(self) -> dict[str, Tensor]:
        return {key: getattr(self, key).clone() for key in self._KEYS}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = [key for key in self._KEYS if key not in state]
        if missing:
            raise ValueError(f"calibration state is missing {missing}")
        restored = KernelCalibration(*(state[key] for key in self._KEYS))
        for key in self._KEYS:
            setattr(self, key, getattr(restored, key))

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> KernelCalibration:
        missing = [key for key in cls._KEYS if key not in state]
        if missing:
            raise ValueError(f"calibration state is missing {missing}")
        return cls(*(state[key] for key in cls._KEYS))

    def save(self, path: str | Path) -> None:
        torch.save(self.state_dict(), Path(path))

    @classmethod
    def load(cls, path: str | Path) -> KernelCalibration:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no kernel calibration at {path}")
        return cls.from_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def _check_pair(u: Tensor, v: Tensor) -> None:
    if u.ndim != 2 or u.shape != v.shape:
        raise ValueError(
            f"log_kernel expects two (B x k) tensors of the same shape, got {tuple(u.shape)} and {tuple(v.shape)}"
        )


def _entropy(log_probs: Tensor) -> Tensor:
    return -(log_probs.exp() * log_probs).sum()


class KernelModule(nn.Module):
    """A kernel K(u, v) evaluated row-wise in log space."""

    def log_kernel(self, u: Tensor, v: Tensor) -> Tensor:
        """log K(u_i, v_i) for each row i of u, v (B × k) -> (B,), in at least float32."""
        _check_pair(u, v)
        dtype = torch.promote_types(torch.promote_types(u.dtype, v.dtype), torch.float32)
        return self._log_kernel(u.to(dtype), v.to(dtype))

    def forward(self, u: Tensor, v: Tensor) -> Tensor:
        return self.log_kernel(u, v)

    def _log_kernel(self, u: Tensor, v: Tensor) -> Tensor:
        raise NotImplementedError

    def weights(self) -> dict[str, float]:
        """Mixture weights for logging; empty for a single kernel."""
        return {}

    def entropy_penalty(self) -> Tensor:
        """Anti-collapse term added to the loss; zero for a single kernel."""
        return torch.zeros(())

    def mixture_parameters(self) -> list[nn.Parameter]:
        """The mixture logits θ, which get their own learning rate."""
        return []


class RBFKernel(KernelModule):
    """log K = -||u - v||^2 / (2 sigma^2)."""

    def __init__(self, sigma: float = 1.0) -> None:
        super().__init__()
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.sigma = float(sigma)

    def _log_kernel(self, u: Tensor, v: Tensor) -> Tensor:
        return -(u - v).pow(2).sum(-1) / (2.0 * self.sigma**2)


class PolynomialKernel(KernelModule):
    """K = ((u.v + c) / (1 + c))^d, clamped below at 1e-6 so log K exists."""

    def __init__(self, c: float = 1.0, degree: int = 2) -> None:
        super().__init__()
        if c < 0:
            raise ValueError(f"poly_c must be >= 0, got {c}")
        if int(degree) != degree or degree < 1:
            raise ValueError(f"poly_degree must be an integer >= 1, got {degree}")
        self.c = float(c)
        self.degree = int(degree)

    def _log_kernel(self, u: Tensor, v: Tensor) -> Tensor:
        base = ((u * v).sum(-1) + self.c) / (1.0 + self.c)
        return base.pow(self.degree).clamp_min(POLY_CLAMP).log()


class SpectralKernel(KernelModule):
    """K = sum_j w_j exp(-(φ_j.(u - v))^2 / (2 s_j)) over calibration principal directions."""

    def __init__(self, calibration: KernelCalibration) -> None:
        super().__init__()
        self.register_buffer("components", calibration.components.clone())
        self.register_buffer("variances", calibration.variances.clone())
        self.register_buffer("log_w", calibration.weights.clamp_min(1e-30).log())

    def _log_kernel(self, u: Tensor, v: Tensor) -> Tensor:
        if u.shape[-1] != self.components.shape[1]:
            raise ValueError(
                f"spectral kernel calibrated for dim {self.components.shape[1]}, got vectors of dim {u.shape[-1]}"
            )
        proj = (u - v) @ self.components.to(u.dtype).T  # B × p
        log_w = torch.log_softmax(self.log_w.to(u.dtype), dim=0)  # renormalised so K(u, u) = 1 in u's dtype
        terms = log_w - proj.pow(2) / (2.0 * self.variances.to(u.dtype))
        return torch.logsumexp(terms, dim=-1)


class MahalanobisKernel(KernelModule):
    """log K = -(u - v)^T Σ^-1 (u - v) / (2k), Σ the Ledoit-Wolf covariance of the calibration set."""

    def __init__(self, calibration: KernelCalibration) -> None:
        super().__init__()
        self.register_buffer("precision", calibration.precision.clone())

    def _log_kernel(self, u: Tensor, v: Tensor) -> Tensor:
        k = self.precision.shape[0]
        if u.shape[-1] != k:
            raise ValueError(f"Mahalanobis kernel calibrated for dim {k}, got vectors of dim {u.shape[-1]}")
        d = u - v
        return -((d @ self.precision.to(u.dtype)) * d).sum(-1) / (2.0 * k)


def _base_kernels(cfg: KernelConfig, calibration: KernelCalibration) -> nn.ModuleList:
    return nn.ModuleList(
        [
            RBFKernel(cfg.sigma),
            PolynomialKernel(cfg.poly_c, cfg.poly_degree),
            SpectralKernel(calibration),
            MahalanobisKernel(calibration),
        ]
    )


class FlatMixtureKernel(KernelModule):
    """K = sum_i λ_i K_i, λ = softmax(θ) over rbf, poly, spectral, mahalanobis (collapse-prone baseline)."""

    def __init__(self, cfg: KernelConfig, calibration: KernelCalibration) -> None:
        super().__init__()
        self.kernels = _base_kernels(cfg, calibration)
        self.eta = float(cfg.entropy_eta)
        self.theta = nn.Parameter(torch.zeros(len(self.kernels)))

    def _log_kernel(self, u: Tensor, v: Tensor) -> Tensor:
        log_k = torch.stack([kern.log_kernel(u, v) for kern in self.kernels], dim=-1)
        log_lam = torch.log_softmax(self.theta.to(u.dtype), dim=0)
        return torch.logsumexp(log_k + log_lam, dim=-1)

    def weights(self) -> dict[str, float]:
        lam = torch.softmax(self.theta.detach().float(), dim=0).tolist()
        return {f"lambda_{name}": float(w) for name, w in zip(MIXTURE_BASE_KERNELS, lam, strict=True)}

    def entropy_penalty(self) -> Tensor:
        return -self.eta * _entropy(torch.log_softmax(self.theta, dim=0))

    def mixture_parameters(self) -> list[nn.Parameter]:
        return [self.theta]


class HierarchicalMixtureKernel(KernelModule):
    """HMK: K = τ1 (λ1 K_rbf + λ2 K_poly) + τ2 (λ3 K_spectral + λ4 K_maha), softmax at both levels."""

    def __init__(self, cfg: KernelConfig, calibration: KernelCalibration) -> None:
        super().__init__()
        self.kernels = _base_kernels(cfg, calibration)
        self.eta = float(cfg.entropy_eta)
        self.theta_local = nn.Parameter(torch.zeros(2))
        self.theta_global = nn.Parameter(torch.zeros(2))
        self.theta_tau = nn.Parameter(torch.zeros(2))

    def _log_weights(self, dtype: torch.dtype) -> Tensor:
        log_tau = torch.log_softmax(self.theta_tau.to(dtype), dim=0)
        log_local = torch.log_softmax(self.theta_local.to(dtype), dim=0)
        log_global = torch.log_softmax(self.theta_global.to(dtype), dim=0)
        return torch.cat([log_tau[0] + log_local, log_tau[1] + log_global])

    def _log_kernel(self, u: Tensor, v: Tensor) -> Tensor:
        log_k = torch.stack([kern.log_kernel(u, v) for kern in self.kernels], dim=-1)
        return torch.logsumexp(log_k + self._log_weights(u.dtype), dim=-1)

    def weights(self) -> dict[str, float]:
        with torch.no_grad():
            local = torch.softmax(self.theta_local.float(), 0).tolist()
            glob = torch.softmax(self.theta_global.float(), 0).tolist()
            tau = torch.softmax(self.theta_tau.float(), 0).tolist()
        return {name: float(w) for name, w in zip(MIXTURE_WEIGHTS, local + glob + tau, strict=True)}

    def entropy_penalty(self) -> Tensor:
        total = sum(
            _entropy(torch.log_softmax(t, dim=0)) for t in (self.theta_local, self.theta_global, self.theta_tau)
        )
        return -self.eta * total

    def mixture_parameters(self) -> list[nn.Parameter]:
        return [self.theta_local, self.theta_global, self.theta_tau]


def build_kernel(cfg: KernelConfig, calibration: KernelCalibration | None) -> KernelModule | None:
    """The kernel module for a config; None for "none". Spectral, Mahalanobis and mixtures need a calibration."""
    if cfg.name == "none":
        return None
    if cfg.name == "rbf":
        return RBFKernel(cfg.sigma)
    if cfg.name == "polynomial":
        return PolynomialKernel(cfg.poly_c, cfg.poly_degree)
    if calibration is None:
        raise ValueError(f"kernel {cfg.name!r} needs a KernelCalibration (spectral directions / Mahalanobis precision)")
    if cfg.name == "spectral":
        return SpectralKernel(calibration)
    if cfg.name == "mahalanobis":
        return MahalanobisKernel(calibration)
    if cfg.name == "mixture":
        return FlatMixtureKernel(cfg, calibration)
    if cfg.name == "hmk":
        return HierarchicalMixtureKernel(cfg, calibration)
    raise ValueError(f"unknown kernel {cfg.name!r}")


def gram_log_kernel(kernel: KernelModule, U: Tensor, V: Tensor) -> Tensor:
    """Matrix of log K(U_i, V_j), n × m (used for PSD checks and plots)."""
    if U.ndim != 2 or V.ndim != 2 or U.shape[1] != V.shape[1]:
        raise ValueError(f"gram_log_kernel expects (n x k) and (m x k), got {tuple(U.shape)} and {tuple(V.shape)}")
    n, m = U.shape[0], V.shape[0]
    uu = U[:, None, :].expand(n, m, -1).reshape(n * m, -1)
    vv = V[None, :, :].expand(n, m, -1).reshape(n * m, -1)
    return kernel.log_kernel(uu, vv).reshape(n, m)


def random_orthogonal_projection(dim_in: int, dim_out: int, seed: int) -> Tensor:
    """A fixed dim_in × dim_out matrix with orthonormal columns, reproducible from the run seed.

    Projected vectors are shorter than the originals; re-normalise after projecting.
    """
    if dim_out < 1 or dim_in < 1:
        raise ValueError(f"projection dims must be >= 1, got {dim_in} -> {dim_out}")
    if dim_out > dim_in:
        raise ValueError(f"cannot project {dim_in} dims up to {dim_out}; use dim_out <= dim_in")
    gen = torch.Generator().manual_seed(int(seed))
    gaussian = torch.randn(dim_in, dim_out, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    # Fix the sign ambiguity of QR so the matrix depends on the seed alone.
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return (q * signs).float()
