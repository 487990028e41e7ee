"""The convolutional VAE of Cremer, Li & Duvenaud (2018) for CIFAR-10: a conv encoder trunk and a
deconvolutional decoder.

Their code (github.com/lxuechen/inference-suboptimality, cvae.py) uses, for 3x32x32 images and ELU:

    encoder  conv 3 -> 64 -> 128 -> 256 (kernel 4, stride 2), flatten, linear -> (mu, log_var)
    decoder  linear z -> 256 x 2 x 2, deconv 256 -> 128 -> 64 -> 3 (kernel 4, stride 2)

with batch normalisation after each hidden (de)convolution. Here each (de)convolution has kernel 4,
stride 2 and padding 1, so it halves (doubles) the height and width exactly (32 -> 16 -> 8 -> 4),
the decoder mirrors the encoder's shapes for any image size (an output padding of 1 where the
encoder rounded down), and the channel widths are configurable (``channels``, paper (64, 128, 256)).
There is no batch normalisation: with it, a datapoint's log p(x|z) in training mode depends on the
other datapoints of its batch and differs from the evaluation-mode function, while every bound here
needs p(x|z) to be one fixed function of z.

The decoder's last deconvolution gives P C channels, P = the likelihood's parameters per pixel
(Bernoulli: the logits; discretised logistic: means, then log-scales), flattened channels-first to
(..., P D) as the MLP decoder's output, so both decoders share ``DecoderBase``'s Model interface:
``log_prior(z)`` and ``log_likelihood(x, z)`` of x (B, D) flattened (C, H, W) and z (K, B, Z).
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from gapbench.models.likelihoods import make_likelihood
from gapbench.models.mlp import ACTIVATIONS
from gapbench.models.vae import DecoderBase

KERNEL, STRIDE, PADDING = 4, 2, 1  # out = floor(in / 2) for a convolution; out = 2 in (+1) for a deconvolution


def conv_shapes(image_shape: tuple[int, int, int], channels: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """The (C, H, W) of the image and of each convolution's output: ``len(channels) + 1`` shapes."""
    shapes = [tuple(image_shape)]
    for width in channels:
        _, height, breadth = shapes[-1]
        height, breadth = (height + 2 * PADDING - KERNEL) // STRIDE + 1, (breadth + 2 * PADDING - KERNEL) // STRIDE + 1
        if height < 1 or breadth < 1:
            raise ValueError(f"images of shape {tuple(image_shape)} are too small for {len(channels)} stride-2 "
                             "convolutions; use fewer model.conv_channels")
        shapes.append((width, height, breadth))
    return shapes  # type: ignore[return-value]


class ConvTrunk(nn.Module):
    """Encoder features h(x): x (B, D) as images (B, C, H, W), stride-2 convolutions with the
    activation after each, flattened: (B, F) with F = channels[-1] * H_L * W_L.

    Parameters
    ----------
    image_shape : (C, H, W), D = C H W
    channels : output channels of each convolution (paper: (64, 128, 256))
    activation : nonlinearity name (paper: "elu")
    """

    def __init__(self, image_shape: tuple[int, int, int], channels: tuple[int, ...] = (64, 128, 256),
                 activation: str = "elu"):
        super().__init__()
        if not channels:
            raise ValueError("a convolutional trunk needs at least one convolution (model.conv_channels)")
        self.image_shape = tuple(image_shape)
        shapes = conv_shapes(self.image_shape, tuple(channels))
        layers: list[nn.Module] = []
        for (c_in, _, _), (c_out, _, _) in itertools.pairwise(shapes):
            layers += [nn.Conv2d(c_in, c_out, KERNEL, STRIDE, PADDING), ACTIVATIONS[activation]()]
        self.net = nn.Sequential(*layers)
        self.feature_size = math.prod(shapes[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, D) -> features (B, F)."""
        images = x.reshape(-1, *self.image_shape)  # (B, C, H, W); rows are channels-first
        return self.net(images).flatten(1)  # (B, F)


class ConvDecoder(DecoderBase):
    """p(z) p(x|z) with the parameters of p(x|z) from a deconvolutional network.

    z -> linear -> (channels[-1], H_L, W_L) -> deconvolutions through ``reversed(channels)`` -> P C
    channels of H x W, the activation after every layer but the last.

    Parameters
    ----------
    image_shape : (C, H, W), D = C H W
    latent_size : Z
    channels : the encoder's convolution widths, mirrored here (paper: (64, 128, 256))
    activation : nonlinearity name (paper: "elu")
    likelihood : "bernoulli" or "logistic"
    num_levels : L, the pixel levels of the discretised logistic
    """

    def __init__(self, image_shape: tuple[int, int, int], latent_size: int,
                 channels: tuple[int, ...] = (64, 128, 256), activation: str = "elu",
                 likelihood: str = "logistic", num_levels: int = 256):
        super().__init__()
        if not channels:
            raise ValueError("a convolutional decoder needs at least one deconvolution (model.conv_channels)")
        self.image_shape = tuple(image_shape)
        self.data_size = math.prod(self.image_shape)
        self.latent_size = latent_size
        self.likelihood = make_likelihood(likelihood, num_levels=num_levels)
        shapes = conv_shapes(self.image_shape, tuple(channels))  # the encoder's, image first
        self.start_shape = shapes[-1]  # (C_L, H_L, W_L)
        self.linear = nn.Linear(latent_size, math.prod(self.start_shape))
        self.activation = ACTIVATIONS[activation]()
        targets = list(reversed(shapes[:-1]))  # the shapes to grow back to, ending with the image
        targets[-1] = (self.likelihood.params_per_pixel * self.image_shape[0], *self.image_shape[1:])
        layers: list[nn.Module] = []
        current = self.start_shape
        for i, target in enumerate(targets):
            padding = (target[1] - STRIDE * current[1], target[2] - STRIDE * current[2])  # 0 or 1 each
            layers.append(nn.ConvTranspose2d(current[0], target[0], KERNEL, STRIDE, PADDING, output_padding=padding))
            if i < len(targets) - 1:
                layers.append(ACTIVATIONS[activation]())
            current = target
        self.net = nn.Sequential(*layers)

    def params(self, z: torch.Tensor) -> torch.Tensor:
        """(..., Z) -> (..., P D): per pixel, P parameter planes of (C, H, W), flattened channels-first."""
        leading = z.shape[:-1]  # e.g. (K, B)
        h = self.activation(self.linear(z.reshape(-1, self.latent_size)))  # (K B, F)
        out = self.net(h.reshape(-1, *self.start_shape))  # (K B, P C, H, W)
        return out.reshape(*leading, -1)  # (K, B, P D): [plane 1 (D), plane 2 (D)] for P = 2
