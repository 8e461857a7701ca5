"""The chunked LM head (dpo_engine/lm_head.py) and the divergences formed from hidden states give the
values and gradients of the plain path on full (N × V) logits, checked with autograd on the plain path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpo_engine.divergences import (
    ALL_DIVERGENCES,
    DivergenceConfig,
    all_token_divergences,
    all_token_divergences_from_hidden,
    token_divergence,
    token_divergence_from_hidden,
)
from dpo_engine.lm_head import head_token_logps, perturbed_token_logps
from dpo_engine.logit_chunks import HEAD_CHUNK_MIN_ROWS, HEAD_CHUNK_ROWS, head_chunk_rows
from dpo_engine.losses import epsilon_dpo_steps_from_token_logps, epsilon_dpo_steps_tokens, epsilon_grid, token_logps

N, H, V = 37, 16, 300


def _inputs(seed: int = 0, weight_grad: bool = False):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen, dtype=torch.float64).requires_grad_()
    ref_hidden = hidden.detach() + 0.3 * torch.randn(N, H, generator=gen, dtype=torch.float64)
    weight = (torch.randn(V, H, generator=gen, dtype=torch.float64) * 0.5).requires_grad_(weight_grad)
    labels = torch.randint(0, V, (N,), generator=gen)
    upstream = torch.randn(N, generator=gen, dtype=torch.float64)
    return hidden, ref_hidden, weight, labels, upstream


@pytest.mark.parametrize("weight_grad", [False, True])
@pytest.mark.parametrize("chunk_rows", [1, 8, 1000])
def test_head_token_logps_equal_the_full_logit_path_in_value_and_gradient(weight_grad, chunk_rows):
    hidden, _, weight, labels, upstream = _inputs(weight_grad=weight_grad)
    plain = token_logps(hidden @ weight.T, labels)
    grads_plain = torch.autograd.grad((plain * upstream).sum(), [hidden, weight] if weight_grad else [hidden])
    chunked = head_token_logps(hidden, weight, labels, chunk_rows=chunk_rows)
    grads = torch.autograd.grad((chunked * upstream).sum(), [hidden, weight] if weight_grad else [hidden])
    np.testing.assert_allclose(chunked.detach().numpy(), plain.detach().numpy(), rtol=0, atol=1e-12)
    for got, want in zip(grads, grads_plain):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-12)
    with torch.no_grad():
        np.testing.assert_allclose(head_token_logps(hidden, weight, labels).numpy(), plain.detach().numpy(), atol=1e-12)


def test_bfloat16_gradient_of_confident_tokens_is_as_accurate_as_the_plain_bfloat16_path():
    """A confident token's gradient, W[y] - softmax(z)ᵀW, is a small difference of two near-equal
    vectors: it must be formed before rounding to bf16, as autograd's plain path does (e_y - p)."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(64, 32, generator=gen, dtype=torch.float64)
    weight = torch.randn(512, 32, generator=gen, dtype=torch.float64)
    labels = (hidden @ weight.T).argmax(-1)
    hidden = hidden * 6  # p_y of most labels above 0.99
    exact = torch.autograd.grad(token_logps(hidden.requires_grad_() @ weight.T, labels).sum(), [hidden])[0]
    p_y = torch.softmax(hidden.detach() @ weight.T, -1).gather(-1, labels[:, None])
    assert float(p_y.median()) > 0.99

    def error(fn) -> float:
        h = hidden.detach().bfloat16().requires_grad_()
        (g,) = torch.autograd.grad(fn(h, weight.bfloat16()).sum(), [h])
        return float(((g.double() - exact).norm(dim=-1) / exact.norm(dim=-1)).median())

    plain = error(lambda h, w: token_logps(h @ w.T, labels))
    chunked = error(lambda h, w: head_token_logps(h, w, labels, chunk_rows=16))
    assert chunked < max(2 * plain, 0.02), (chunked, plain)


def test_head_token_logps_float32_within_1e_5_of_the_plain_path():
    hidden, _, weight, labels, upstream = _inputs()
    h32 = hidden.detach().float().requires_grad_()
    w32 = weight.detach().float()
    plain = token_logps(h32 @ w32.T, labels)
    (g_plain,) = torch.autograd.grad((plain * upstream.float()).sum(), [h32])
    chunked = head_token_logps(h32, w32, labels, chunk_rows=5)
    (g,) = torch.autograd.grad((chunked * upstream.float()).sum(), [h32])
    assert chunked.dtype == torch.float32
    np.testing.assert_allclose(chunked.detach().numpy(), plain.detach().numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(g.numpy(), g_plain.numpy(), rtol=0, atol=1e-5)


def test_default_chunk_follows_the_hidden_size_within_its_bounds(monkeypatch):
    assert head_chunk_rows(64) == HEAD_CHUNK_MIN_ROWS  # narrow head: small chunks that stay in cache
    assert head_chunk_rows(576) == 144
    assert head_chunk_rows(4096) == HEAD_CHUNK_ROWS
    # 300 rows of H = 512 go in chunks of 512 / 4 = 128 rows (the vocabulary, 40, would give 64), with
    # the one-chunk values
    from dpo_engine import lm_head

    calls = []
    monkeypatch.setattr(lm_head, "head_logits", lambda h, w, _t: calls.append(len(h)) or h @ w.T)
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(300, 512, generator=gen, dtype=torch.float64)
    weight = torch.randn(40, 512, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 40, (300,), generator=gen)
    got = head_token_logps(hidden, weight, labels)
    assert calls == [128, 128, 44]
    np.testing.assert_allclose(got.numpy(), token_logps(hidden @ weight.T, labels).numpy(), atol=1e-12)


def test_divergences_with_the_automatic_chunk_equal_one_chunk(monkeypatch):
    from dpo_engine import divergences

    chunks = []
    rows = divergences._Logits.rows
    monkeypatch.setattr(divergences._Logits, "rows", lambda self, pos: chunks.append(len(pos)) or rows(self, pos))
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(300, 512, generator=gen, dtype=torch.float64).requires_grad_()
    ref = torch.randn(300, 512, generator=gen, dtype=torch.float64)
    weight = torch.randn(40, 512, generator=gen, dtype=torch.float64) * 0.1
    for name in ("kl", "wasserstein"):
        auto = DivergenceConfig(name=name)  # 512 // 4 = 128 rows a chunk (the vocabulary, 40, would give 64)
        one = auto.model_copy(update={"chunk_positions": 10_000})
        values = []
        for cfg in (auto, one):
            chunks.clear()
            value = token_divergence_from_hidden(cfg, hidden, ref, weight, output_embeddings=weight)
            (grad,) = torch.autograd.grad(value, [hidden])
            values.append((value.item(), grad.numpy()))
            if cfg is auto:
                assert set(chunks) == {128, 44}, name  # policy and reference rows, chunk by chunk
        assert values[0][0] == pytest.approx(values[1][0], abs=1e-12)
        np.testing.assert_allclose(values[0][1], values[1][1], atol=1e-12)


def test_head_token_logps_rejects_bad_shapes_and_labels():
    hidden, _, weight, labels, _ = _inputs()
    with pytest.raises(ValueError, match="labels must lie in"):
        head_token_logps(hidden, weight, torch.full((N,), V))
    with pytest.raises(ValueError, match="head weight"):
        head_token_logps(hidden, weight[:, :3], labels)
    with pytest.raises(ValueError, match="chunk_rows"):
        head_token_logps(hidden, weight, labels, chunk_rows=0)


def test_perturbed_logps_give_the_epsilon_dpo_steps_of_full_logits():
    hidden, ref_hidden, weight, labels, _ = _inputs(seed=3)
    b = 4
    sequence = torch.arange(N) % (2 * b)
    for eps in (0.01, 0.2):
        z, z_ref = (hidden @ weight.T).detach(), ref_hidden @ weight.T.detach()
        want = epsilon_dpo_steps_tokens(z, z_ref, labels, sequence, b, eps)
        perturbed = perturbed_token_logps(
            hidden.detach(), ref_hidden, weight.detach(), labels, epsilon_grid(eps), chunk_rows=6
        )
        for t, values in zip(epsilon_grid(eps), perturbed):
            np.testing.assert_allclose(values.numpy(), token_logps((1 + t) * z - t * z_ref, labels).numpy(), atol=1e-12)
        assert torch.equal(epsilon_dpo_steps_from_token_logps(perturbed, sequence, b), want)
    assert want.abs().sum() > 0  # the comparison is not between two all-zero vectors


@pytest.mark.parametrize("name", ALL_DIVERGENCES)
@pytest.mark.parametrize("weight_grad", [False, True])
def test_divergence_from_hidden_equals_the_logit_path(name, weight_grad):
    hidden, ref_hidden, weight, _, _ = _inputs(seed=1, weight_grad=weight_grad)
    cfg = DivergenceConfig(name=name, chunk_positions=7)
    emb = weight.detach()
    every = torch.ones((1, N), dtype=torch.bool)
    wrt = [hidden, weight] if weight_grad else [hidden]
    plain = token_divergence(
        cfg, (hidden @ weight.T)[None], (ref_hidden @ weight.T)[None].detach(), every, output_embeddings=emb
    )
    grads_plain = torch.autograd.grad(plain * 1.7, wrt)
    chunked = token_divergence_from_hidden(cfg, hidden, ref_hidden, weight, output_embeddings=emb)
    grads = torch.autograd.grad(chunked * 1.7, wrt)
    assert float(plain.detach()) > 0
    np.testing.assert_allclose(float(chunked.detach()), float(plain.detach()), rtol=1e-10)
    for got, want in zip(grads, grads_plain):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-8, atol=1e-12)
    with torch.no_grad():
        np.testing.assert_allclose(
            float(token_divergence_from_hidden(cfg, hidden, ref_hidden, weight, output_embeddings=emb)),
            float(plain),
            rtol=1e-10,
        )


def test_all_divergences_from_hidden_equal_the_logit_path():
    hidden, ref_hidden, weight, _, _ = _inputs(seed=2)
    cfg = DivergenceConfig(chunk_positions=5)
    h, w = hidden.detach(), weight.detach()
    every = torch.ones((1, N), dtype=torch.bool)
    want = all_token_divergences((h @ w.T)[None], (ref_hidden @ w.T)[None], every, cfg, w)
    got = all_token_divergences_from_hidden(h, ref_hidden, w, cfg, w)
    assert list(got) == list(want)
    for key in want:
        assert want[key] > 0
        np.testing.assert_allclose(got[key], want[key], rtol=1e-10)


def test_a_reference_with_its_own_head_gets_its_own_logits():
    """After full fine-tuning of a tied head the reference's head differs from the policy's."""
    hidden, ref_hidden, weight, labels, _ = _inputs(seed=4, weight_grad=True)
    ref_weight = weight.detach() + 0.2 * torch.randn(
        V, H, generator=torch.Generator().manual_seed(5), dtype=torch.float64
    )
    cfg = DivergenceConfig(name="js", chunk_positions=9)
    every = torch.ones((1, N), dtype=torch.bool)
    plain = token_divergence(cfg, (hidden @ weight.T)[None], (ref_hidden @ ref_weight.T)[None], every)
    chunked = token_divergence_from_hidden(cfg, hidden, ref_hidden, weight, ref_head_weight=ref_weight)
    np.testing.assert_allclose(float(chunked.detach()), float(plain.detach()), rtol=1e-10)
    for got, want in zip(torch.autograd.grad(chunked, [hidden, weight]), torch.autograd.grad(plain, [hidden, weight])):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-8, atol=1e-12)
    h, w = hidden.detach(), weight.detach()
    z, z_ref = h @ w.T, ref_hidden @ ref_weight.T
    (got,) = perturbed_token_logps(h, ref_hidden, w, labels, (0.1,), ref_weight=ref_weight)
    np.testing.assert_allclose(got.numpy(), token_logps(1.1 * z - 0.1 * z_ref, labels).numpy(), atol=1e-12)
    assert not np.allclose(got.numpy(), perturbed_token_logps(h, ref_hidden, w, labels, (0.1,))[0].numpy())
    every_got = all_token_divergences_from_hidden(h, ref_hidden, w, cfg, w, ref_head_weight=ref_weight)
    every_want = all_token_divergences(z[None], z_ref[None], every, cfg, w)
    for key in every_want:
        np.testing.assert_allclose(every_got[key], every_want[key], rtol=1e-10)
