"""Convolutional variational autoencoder.

This module owns the model and its loss: the :class:`VAE` network (encoder, reparameterisation, decoder,
sampling from the prior) and the ELBO terms in :class:`VAELoss`.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import VAEConfig

logger = logging.getLogger(__name__)

# The encoder halves the resolution until this side length, then flattens.
_BOTTLENECK_SIDE = 4
_MAX_GROUPS = 8
_LEAKY_SLOPE = 0.2


class VAELoss(NamedTuple):
    """Scalar loss terms, each a mean per image over the batch.

    Attributes:
        total: ``recon + beta * kl``, the negative ELBO to minimise.
        recon: Binary cross-entropy summed over pixels and channels.
        kl: ``KL(q(z|x) || N(0, I))`` summed over latent dimensions.
    """

    total: Tensor
    recon: Tensor
    kl: Tensor


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm rather than BatchNorm: no running statistics, so eval-mode
    # outputs depend on the weights alone and small batches behave the same.
    groups = math.gcd(channels, _MAX_GROUPS)
    return nn.GroupNorm(groups, channels)


class VAE(nn.Module):
    """Convolutional VAE for square images with values in [0, 1].

    The encoder is a stack of stride-2 4x4 convolutions (GroupNorm + LeakyReLU)
    that halves the resolution down to 4x4, followed by linear heads for the
    posterior mean and log-variance. The decoder mirrors it with stride-2
    transposed convolutions and ends in a sigmoid.

    Args:
        config: Network shape and loss weight.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        stages = int(math.log2(config.image_size // _BOTTLENECK_SIDE))
        widths = [config.base_channels * 2**i for i in range(stages)]
        self._top_channels = widths[-1]
        flat = widths[-1] * _BOTTLENECK_SIDE * _BOTTLENECK_SIDE

        encoder: list[nn.Module] = []
        in_channels = config.channels
        for width in widths:
            encoder += [
                nn.Conv2d(in_channels, width, kernel_size=4, stride=2, padding=1, bias=False),
                _norm(width),
                nn.LeakyReLU(_LEAKY_SLOPE),
            ]
            in_channels = width
        self.encoder = nn.Sequential(*encoder, nn.Flatten())
        self.to_stats = nn.Linear(flat, 2 * config.latent_dim)

        self.from_latent = nn.Linear(config.latent_dim, flat)
        decoder: list[nn.Module] = [nn.LeakyReLU(_LEAKY_SLOPE)]
        for width_in, width_out in zip(widths[::-1], widths[-2::-1]):
            decoder += [
                nn.ConvTranspose2d(width_in, width_out, kernel_size=4, stride=2, padding=1, bias=False),
                _norm(width_out),
                nn.LeakyReLU(_LEAKY_SLOPE),
            ]
        decoder.append(nn.ConvTranspose2d(widths[0], config.channels, kernel_size=4, stride=2, padding=1))
        self.decoder = nn.Sequential(*decoder)
        logger.debug(
            "built VAE with %d parameters, widths %s: %s",
            sum(p.numel() for p in self.parameters()),
            widths,
            config,
        )

    def _check_images(self, x: Tensor) -> None:
        expected = (self.config.channels, self.config.image_size, self.config.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"expected images of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}; "
                "resize or reshape the batch to match VAEConfig"
            )

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Compute the approximate posterior ``q(z|x)``.

        Args:
            x: Images, float in [0, 1], shape ``(B, C, H, W)``.

        Returns:
            ``(mu, logvar)``, each of shape ``(B, latent_dim)``.

        Raises:
            ValueError: If ``x`` does not match the configured shape.
        """
        self._check_images(x)
        mu, logvar = self.to_stats(self.encoder(x)).chunk(2, dim=1)
        return mu, logvar

    def _decode_logits(self, z: Tensor) -> Tensor:
        side = _BOTTLENECK_SIDE
        h = self.from_latent(z).view(-1, self._top_channels, side, side)
        return self.decoder(h)

    def decode(self, z: Tensor) -> Tensor:
        """Map latent vectors to images.

        Args:
            z: Latent vectors, shape ``(B, latent_dim)``.

        Returns:
            Images in [0, 1], shape ``(B, C, H, W)``.
        """
        return torch.sigmoid(self._decode_logits(z))

    def _forward_logits(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encode(x)
        if self.training:
            # Reparameterisation trick: the noise carries no gradient, so
            # gradients reach mu and logvar through a differentiable path.
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        else:
            z = mu
        return self._decode_logits(z), mu, logvar

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Encode, sample ``z`` (training) or take ``mu`` (eval), and decode.

        Args:
            x: Images, float in [0, 1], shape ``(B, C, H, W)``.

        Returns:
            ``(x_hat, mu, logvar)``: reconstructions in [0, 1] shaped like
            ``x``, and the posterior parameters, each ``(B, latent_dim)``.
        """
        logits, mu, logvar = self._forward_logits(x)
        return torch.sigmoid(logits), mu, logvar

    def loss(self, x: Tensor) -> tuple[Tensor, VAELoss]:
        """Reconstruct ``x`` and compute the negative ELBO.

        Args:
            x: Images, float in [0, 1], shape ``(B, C, H, W)``.

        Returns:
            ``(x_hat, VAELoss)``. ``recon`` is the BCE summed over pixels and
            channels, ``kl`` the KL divergence to ``N(0, I)`` summed over
            latent dimensions, both averaged over the batch;
            ``total = recon + beta * kl``.
        """
        logits, mu, logvar = self._forward_logits(x)
        batch = x.shape[0]
        # BCE on logits is the numerically stable form of BCE(sigmoid(logits), x).
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / batch
        kl = -0.5 * torch.sum(1.0 + logvar - mu.pow(2) - logvar.exp()) / batch
        total = recon + self.config.beta * kl
        return torch.sigmoid(logits), VAELoss(total=total, recon=recon, kl=kl)

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """Decode ``n`` latent vectors drawn from the prior ``N(0, I)``.

        Args:
            n: Number of images, at least 1.
            generator: Optional RNG for reproducible samples; it must live on
                the model's device.

        Returns:
            Images in [0, 1], shape ``(n, C, H, W)``, without gradient history.

        Raises:
            ValueError: If ``n`` < 1.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}; ask for at least one sample")
        weight = self.from_latent.weight
        z = torch.randn(n, self.config.latent_dim, generator=generator, device=weight.device, dtype=weight.dtype)
        return self.decode(z)
