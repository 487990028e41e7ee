"""The structured posterior of a two-layer model, q(z1|x) q(z2|z1), amortized and local.

    q(z1|x)  = N(m1, diag exp(l1))                          (B, Z1) parameters per datapoint
    q(z2|z1) = N(mu2(z1), diag exp(lambda2(z1)))            an MLP g: z1 -> (mu2, lambda2)
    log q(z) = log q(z1|x) + log q(z2|z1),  z = concat(z1, z2)

Sampling is ancestral and reparameterised: eps ~ N(0, I) of size Z1 + Z2 (one chunk-consistent draw),
z1 = m1 + exp(l1 / 2) eps1, z2 = mu2(z1) + exp(lambda2(z1) / 2) eps2.

Parameters are a dict of tensors, as for the flows (``flowbase``): ``mean``, ``log_var`` (B, Z1) for
q(z1) and ``weight_i`` (O, I), ``bias_i`` (O,) for the layers of g. A tensor with one more dimension
than its per-datapoint shape holds one value per datapoint, otherwise it is shared. The encoder
(:class:`HierarchicalEncoder`) gives per-datapoint ``mean``/``log_var`` from x and shares g's weights;
the local family (:class:`HierarchicalFamily`) holds *every* tensor per datapoint.

Why this local family. The amortization gap L[q*] - L[q] is only about amortization when q* is the
best member of the *same* family as the encoder's q. The encoder's family is: a diagonal Gaussian
over z1 and an MLP conditional over z2 of the given widths. Its local form frees every parameter
per datapoint, the conditional's weights included, so (i) it contains the encoder's posterior
exactly (init "encoder" starts there, and zero refinement steps give exactly L[q]), and (ii) it
keeps the dependence of z2 on z1 that the model's posterior has (p(z2|z1, x) = p(z2|z1)). A
mean-field FFG over (z1, z2) would be simpler but is a different, smaller family: the difference
L[q*_FFG] - L[q] would mix the cost of the mean-field assumption into the amortization gap. (The
FFG over the joint latent still works through the Python API, ``family="ffg"``, from the prior or
from a diagonal Gaussian fitted to the encoder's samples, for whoever wants that comparison.)
Refinement stays batched: g's layers with per-datapoint weights are batched matmuls
(``flowbase.linear``). The price, for one hidden layer of width H, is 2 Z1 + (Z1 + 1) H + 2 (H + 1) Z2
parameters per datapoint (2,160 for experiments/digits_hierarchical.toml), small next to one decoder pass.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn

from gapbench.models.likelihoods import standard_normal_log_prob
from gapbench.models.mlp import ACTIVATIONS, mlp
from gapbench.posteriors.flowbase import linear
from gapbench.posteriors.gaussian import LOG_2PI
from gapbench.posteriors.noise import RandomStream, random_uniform, standard_normal
from gapbench.random import DatapointStreams


def _layer_names(num_layers: int) -> list[tuple[str, str]]:
    return [(f"weight_{i}", f"bias_{i}") for i in range(num_layers)]


class HierarchicalPosterior:
    """q(z1) q(z2|z1) for B datapoints; see the module docstring for ``params``.

    Parameters
    ----------
    params : ``mean``, ``log_var`` (B, Z1); ``weight_i`` (O_i, I_i) or (B, O_i, I_i), ``bias_i``
        (O_i,) or (B, O_i) for the layers of g, the last with O = 2 Z2
    activation : the nonlinearity between g's layers
    """

    def __init__(self, params: Mapping[str, torch.Tensor], activation: str = "elu"):
        self.params = dict(params)
        self.activation = activation
        self.num_layers = sum(1 for k in self.params if k.startswith("weight_"))
        self._act = ACTIVATIONS[activation]()
        if self.params["mean"].ndim != 2 or self.params["log_var"].shape != self.params["mean"].shape:
            raise ValueError("a hierarchical posterior needs 'mean' and 'log_var' of shape (B, Z1)")

    @property
    def latent_size_1(self) -> int:
        return self.params["mean"].shape[1]

    @property
    def latent_size_2(self) -> int:
        return self.params[f"weight_{self.num_layers - 1}"].shape[-2] // 2

    def conditional(self, z1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of q(z2|z1): z1 (K, B, Z1) -> (K, B, Z2) each."""
        h = z1
        for i, (w, b) in enumerate(_layer_names(self.num_layers)):
            h = linear(h, self.params[w], self.params[b])  # (K, B, O_i)
            if i < self.num_layers - 1:
                h = self._act(h)
        mean, log_var = h.chunk(2, dim=-1)  # (K, B, Z2) each
        return mean, log_var

    def rsample_and_log_prob(self, num_samples: int, *,
                             generator: RandomStream | None) -> tuple[torch.Tensor, torch.Tensor]:
        """z = concat(z1, z2) (K, B, Z1 + Z2) and log q(z1) + log q(z2|z1) (K, B)."""
        mean1, log_var1 = self.params["mean"], self.params["log_var"]
        z1_size = self.latent_size_1
        eps = standard_normal((num_samples, mean1.shape[0], z1_size + self.latent_size_2), generator=generator,
                              dtype=mean1.dtype, device=mean1.device)  # (K, B, Z1 + Z2)
        eps1, eps2 = eps[..., :z1_size], eps[..., z1_size:]
        z1 = mean1 + torch.exp(0.5 * log_var1) * eps1  # (K, B, Z1)
        mean2, log_var2 = self.conditional(z1)  # (K, B, Z2) each
        z2 = mean2 + torch.exp(0.5 * log_var2) * eps2  # (K, B, Z2)
        log_q = (standard_normal_log_prob(eps1) - 0.5 * log_var1.sum(-1)
                 + standard_normal_log_prob(eps2) - 0.5 * log_var2.sum(-1))  # (K, B)
        return torch.cat([z1, z2], dim=-1), log_q

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log q(z1) + log q(z2|z1) at z (K, B, Z1 + Z2); returns (K, B)."""
        z1, z2 = z[..., :self.latent_size_1], z[..., self.latent_size_1:]
        mean2, log_var2 = self.conditional(z1)  # (K, B, Z2) each
        return _diag_normal_log_prob(z1, self.params["mean"], self.params["log_var"]) + \
            _diag_normal_log_prob(z2, mean2, log_var2)

    def local_params(self) -> dict[str, torch.Tensor]:
        """Every tensor per datapoint (shared ones repeated), detached copies: the parameters of the
        local family that starts exactly at this posterior."""
        num_datapoints = self.params["mean"].shape[0]
        out = {}
        for name, value in self.params.items():
            value = value.detach()
            per_datapoint = name in ("mean", "log_var") or value.ndim == (3 if name.startswith("weight_") else 2)
            out[name] = (value if per_datapoint else value.expand(num_datapoints, *value.shape)).clone()
        return out


def _diag_normal_log_prob(z: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, diag exp(log_var)) summed over the last dimension."""
    return -0.5 * ((z - mean).square() * torch.exp(-log_var) + log_var + LOG_2PI).sum(-1)


class HierarchicalEncoder(nn.Module):
    """Amortized q(z1|x) q(z2|z1): an MLP x -> (m1, l1) and an MLP g: z1 -> (mu2, lambda2).

    Parameters
    ----------
    data_size : D
    latent_size_1, latent_size_2 : Z1, Z2
    hidden_sizes : hidden widths of x -> z1
    conditional_hidden : hidden widths of g, z1 -> z2
    activation : nonlinearity name
    """

    def __init__(self, data_size: int, latent_size_1: int, latent_size_2: int,
                 hidden_sizes: tuple[int, ...] = (200, 200), conditional_hidden: tuple[int, ...] = (100,),
                 activation: str = "elu"):
        super().__init__()
        self.data_size = data_size
        self.latent_size = latent_size_1 + latent_size_2
        self.activation = activation
        self.net = mlp([data_size, *hidden_sizes, 2 * latent_size_1], activation)
        self.conditional_net = mlp([latent_size_1, *conditional_hidden, 2 * latent_size_2], activation)

    def forward(self, x: torch.Tensor) -> HierarchicalPosterior:
        """x (B, D) -> HierarchicalPosterior with per-datapoint q(z1|x) and g's shared weights."""
        mean, log_var = self.net(x).chunk(2, dim=-1)  # (B, Z1) each
        layers = [m for m in self.conditional_net if isinstance(m, nn.Linear)]
        params = {"mean": mean, "log_var": log_var}
        for layer, (w, b) in zip(layers, _layer_names(len(layers))):
            params[w], params[b] = layer.weight, layer.bias  # (O, I), (O,)
        return HierarchicalPosterior(params, self.activation)


class HierarchicalFamily:
    """Local q(z1) q(z2|z1): every parameter of :class:`HierarchicalPosterior` free per datapoint.

    Parameters
    ----------
    latent_size_1, latent_size_2 : Z1, Z2
    conditional_hidden : hidden widths of g (those of the encoder it is compared with)
    activation : g's nonlinearity
    """

    name = "hierarchical"
    supports_stl = True  # log q(z1) + log q(z2|z1) at any z is one pass of g

    def __init__(self, latent_size_1: int, latent_size_2: int, conditional_hidden: tuple[int, ...] = (100,),
                 activation: str = "elu"):
        self.latent_size_1 = latent_size_1
        self.latent_size_2 = latent_size_2
        self.conditional_hidden = tuple(conditional_hidden)
        self.activation = activation

    def init_params(self, num_datapoints: int, latent_size: int, *, like: torch.Tensor,
                    init_from: HierarchicalPosterior | None = None,
                    generator: RandomStream | None = None) -> dict[str, torch.Tensor]:
        """From a hierarchical posterior (the encoder's output, exactly), or from the prior-like start
        q(z1) = N(0, I), q(z2|z1) = N(0, I): g's last layer zero, its hidden layers drawn as torch's
        nn.Linear default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), from ``generator`` (None: seed 0),
        the same for every datapoint (with per-datapoint streams, :class:`DatapointStreams`, each
        datapoint draws its own from its stream). Returns (B, ...) tensors."""
        if latent_size != self.latent_size_1 + self.latent_size_2:
            raise ValueError(f"latent size {latent_size} is not Z1 + Z2 = {self.latent_size_1 + self.latent_size_2}")
        if init_from is not None:
            if not isinstance(init_from, HierarchicalPosterior):
                raise ValueError("the hierarchical family starts from a HierarchicalPosterior (a "
                                 f"HierarchicalEncoder's output), not a {type(init_from).__name__}")
            params = init_from.local_params()
            if params["mean"].shape != (num_datapoints, self.latent_size_1):
                raise ValueError(f"initial posterior has q(z1) of shape {tuple(params['mean'].shape)}, "
                                 f"expected {(num_datapoints, self.latent_size_1)}")
            return {k: v.to(like) for k, v in params.items()}
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        zeros = like.new_zeros(num_datapoints, self.latent_size_1)  # (B, Z1)
        params = {"mean": zeros, "log_var": zeros.clone()}
        sizes = [self.latent_size_1, *self.conditional_hidden, 2 * self.latent_size_2]
        for i, ((w, b), fan_in, fan_out) in enumerate(zip(_layer_names(len(sizes) - 1), sizes[:-1], sizes[1:])):
            if i == len(sizes) - 2:  # last layer zero: q(z2|z1) = N(0, I)
                params[w] = like.new_zeros(num_datapoints, fan_out, fan_in)
                params[b] = like.new_zeros(num_datapoints, fan_out)
                continue
            bound = 1.0 / math.sqrt(fan_in)
            if isinstance(generator, DatapointStreams):  # each datapoint draws its own layer from its stream
                draw = {"generator": generator, "dtype": like.dtype, "device": like.device, "batch_dim": 0}
                params[w] = (2 * random_uniform((num_datapoints, fan_out, fan_in), **draw) - 1).to(like.device) * bound
                params[b] = (2 * random_uniform((num_datapoints, fan_out), **draw) - 1).to(like.device) * bound
                continue
            weight = (2 * torch.rand(fan_out, fan_in, generator=generator, dtype=like.dtype) - 1) * bound
            bias = (2 * torch.rand(fan_out, generator=generator, dtype=like.dtype) - 1) * bound
            params[w] = weight.to(like.device).expand(num_datapoints, -1, -1).clone()  # (B, O, I)
            params[b] = bias.to(like.device).expand(num_datapoints, -1).clone()  # (B, O)
        return params

    def posterior(self, params: Mapping[str, torch.Tensor]) -> HierarchicalPosterior:
        return HierarchicalPosterior(params, self.activation)

    def step_scale(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor | float]:
        """q(z1)'s mean steps in units of its standard deviation, as the FFG's; g's weight matrices'
        steps divided by the fan-in, so that a step moves a pre-activation by about the step size
        whatever the width (as the flows' weights); biases and log-variances unscaled."""
        scales: dict[str, torch.Tensor | float] = {"mean": torch.exp(0.5 * params["log_var"])}
        for name, value in params.items():
            if name.startswith("weight_"):
                scales[name] = 1.0 / value.shape[-1]
        return scales
