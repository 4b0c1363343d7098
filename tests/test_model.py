"""Tests for the convolutional VAE and its loss (pipeline.train.model)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

from pipeline.demo.demo_set import demo_image
from pipeline.train.model import VAE, VAEConfig, VAELoss

TRAIN_STEPS = 50
LR = 1e-3


def demo_batch(n: int = 16, size: int = 32) -> torch.Tensor:
    """A fixed batch of demo images as float (n, 3, size, size) in [0, 1]."""
    pixels = np.stack([np.asarray(demo_image(index, size=size)) for index in range(n)])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255.0)


def eval_loss(model: VAE, x: torch.Tensor) -> float:
    """Deterministic loss: eval mode decodes mu, and GroupNorm has no running state."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        value = model.loss(x)[1].total.item()
    model.train(was_training)
    return value


def step_correct(model: VAE, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    """Forward, backward, step, then clear gradients for the next iteration."""
    _, loss = model.loss(x)
    loss.total.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def step_zero_grad_before_step(model: VAE, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    """The old bug: gradients are wiped between backward and step."""
    _, loss = model.loss(x)
    loss.total.backward()
    optimizer.zero_grad()
    # This is why nothing learns: the optimizer sees no gradient at all.
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    optimizer.step()


def train(step: Callable[[VAE, torch.optim.Optimizer, torch.Tensor], None]) -> tuple[VAE, float, float]:
    torch.manual_seed(0)
    model = VAE(VAEConfig())
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    x = demo_batch()
    before = eval_loss(model, x)
    for _ in range(TRAIN_STEPS):
        step(model, optimizer, x)
    return model, before, eval_loss(model, x)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 12}, r"image_size must be a power of two >= 8, got 12; resize"),
        ({"image_size": 4}, r"image_size must be a power of two >= 8, got 4; resize"),
        ({"image_size": 0}, r"image_size must be a power of two >= 8, got 0; resize"),
        ({"channels": 0}, r"channels must be >= 1, got 0; use 3 for RGB"),
        ({"latent_dim": 0}, r"latent_dim must be >= 1, got 0; use a positive latent size"),
        ({"beta": -0.5}, r"beta must be a finite number >= 0, got -0.5; use 1.0"),
        ({"beta": math.nan}, r"beta must be a finite number >= 0, got nan; use 1.0"),
        ({"beta": math.inf}, r"beta must be a finite number >= 0, got inf; use 1.0"),
        ({"base_channels": 0}, r"base_channels must be >= 1, got 0; use a positive width"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VAEConfig(**kwargs)


def test_config_is_frozen_and_keyword_only() -> None:
    config = VAEConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.latent_dim = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        VAEConfig(32)  # type: ignore[misc]


def test_config_round_trips_through_dict_and_json() -> None:
    config = VAEConfig(image_size=64, channels=1, latent_dim=7, beta=0.25, base_channels=8)
    assert VAEConfig.from_dict(config.to_dict()) == config
    assert VAEConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_config_from_dict_rejects_unknown_keys() -> None:
    data = {**VAEConfig().to_dict(), "dropout": 0.1}
    with pytest.raises(ValueError, match=r"unknown VAEConfig keys \['dropout'\]"):
        VAEConfig.from_dict(data)


@pytest.mark.parametrize("image_size", [32, 64])
def test_shapes_and_ranges(image_size: int) -> None:
    torch.manual_seed(0)
    config = VAEConfig(image_size=image_size, latent_dim=12, beta=0.5)
    model = VAE(config)
    x = demo_batch(n=4, size=image_size)

    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (4, 12)
    x_hat, mu2, logvar2 = model(x)
    assert x_hat.shape == x.shape
    assert mu2.shape == logvar2.shape == (4, 12)
    assert x_hat.min() >= 0.0 and x_hat.max() <= 1.0

    recon_hat, loss = model.loss(x)
    assert isinstance(loss, VAELoss)
    assert recon_hat.shape == x.shape
    assert all(term.dim() == 0 for term in loss)
    assert loss.recon > 0 and loss.kl >= 0
    torch.testing.assert_close(loss.total, loss.recon + config.beta * loss.kl)


def test_loss_terms_match_their_definitions() -> None:
    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=5)).eval()
    x = demo_batch(n=3)
    x_hat, loss = model.loss(x)
    mu, logvar = model.encode(x)
    per_image_bce = torch.nn.functional.binary_cross_entropy(x_hat, x, reduction="none").sum(dim=(1, 2, 3))
    per_image_kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)
    torch.testing.assert_close(loss.recon, per_image_bce.mean(), rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(loss.kl, per_image_kl.mean())


def test_eval_mode_is_deterministic_and_train_mode_samples() -> None:
    torch.manual_seed(0)
    model = VAE(VAEConfig())
    x = demo_batch(n=2)
    model.eval()
    torch.testing.assert_close(model(x)[0], model(x)[0], rtol=0, atol=0)
    model.train()
    assert not torch.equal(model(x)[0], model(x)[0])


def test_rejects_wrongly_shaped_images() -> None:
    model = VAE(VAEConfig())
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 32, 32\), got \(2, 3, 16, 16\)"):
        model.loss(torch.rand(2, 3, 16, 16))


def test_training_steps_in_the_right_order_lower_the_loss() -> None:
    _, before, after = train(step_correct)
    assert after < 0.7 * before, (before, after)


def test_zero_grad_right_before_step_does_not_learn() -> None:
    torch.manual_seed(0)
    untouched = {name: p.detach().clone() for name, p in VAE(VAEConfig()).named_parameters()}
    model, before, after = train(step_zero_grad_before_step)
    assert after == pytest.approx(before, rel=1e-6)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter, untouched[name], rtol=0, atol=0)


def test_sample_shape_range_and_reproducibility() -> None:
    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=6))
    first = model.sample(5, generator=torch.Generator().manual_seed(11))
    again = model.sample(5, generator=torch.Generator().manual_seed(11))
    other = model.sample(5, generator=torch.Generator().manual_seed(12))
    assert first.shape == (5, 3, 32, 32)
    assert first.min() >= 0.0 and first.max() <= 1.0
    assert not first.requires_grad
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_sample_rejects_non_positive_n() -> None:
    with pytest.raises(ValueError, match=r"n must be >= 1, got 0; ask for at least one sample"):
        VAE(VAEConfig()).sample(0)
