"""What the flow families share: per-datapoint linear layers, gates, the standardised base, the local
form (free parameters per datapoint) and the amortized trunk.

Every flow here acts on the *standardised* base sample: eps_0 ~ N(0, I), the flow maps it to eps_T,
and z = mean + std * eps_T, with ``mean`` and ``log_var`` per datapoint (the encoder's output, or free
parameters). The flow's weights are then dimensionless: a step of 0.1 in a shift means a tenth of the
posterior's width whether that width is 0.01 or 1, which is what lets one step size serve every
datapoint and dimension in local refinement. Flowing z_0 = mean + std * eps_0 directly (as the
papers write it) is the same family for planar flows (the affine map commutes with them after
rescaling u and w) and, for coupling and autoregressive steps, differs only in how the networks'
first and last layers are parametrised.

Parameters are a dict of tensors. A tensor holds one value per datapoint when it has one more
dimension than its per-datapoint shape (the leading B), and is shared by all datapoints otherwise:
an amortized posterior shares the flow's weights and gets per-datapoint base parameters and
first-layer biases from x; a local posterior has every tensor per datapoint, so refinement, which
indexes parameters along dimension 0 only, optimises B flows at once with batched matmuls.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from gapbench.models.likelihoods import standard_normal_log_prob
from gapbench.models.mlp import ACTIVATIONS, mlp
from gapbench.posteriors.gaussian import DiagonalGaussian
from gapbench.posteriors.noise import random_normal, standard_normal

LOG_2 = math.log(2.0)


def linear(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """inputs @ weight^T + bias with a shared or a per-datapoint weight.

    Parameters
    ----------
    inputs : (K, B, I)
    weight : (O, I) shared, or (B, O, I) one matrix per datapoint
    bias : (O,) shared, (B, O) per datapoint, or None

    Returns
    -------
    (K, B, O)
    """
    if weight.ndim == 2:
        out = inputs @ weight.T  # (K, B, O)
    else:
        out = torch.einsum("kbi,boi->kbo", inputs, weight)  # a batched matmul over datapoints
    return out if bias is None else out + bias  # bias broadcasts over samples (and datapoints)


def log_gate(pre_activation: torch.Tensor) -> torch.Tensor:
    """log g with g = 2 sigmoid(a): a sigmoid gate in (0, 2) that is exactly 1 at a = 0.

    Cremer et al. (2018) gate with sigmoid(a) in (0, 1) and start near the identity by adding 5 to a
    (sigmoid(5) = 0.993); doubling the sigmoid makes a zero pre-activation the identity exactly.
    """
    return LOG_2 + F.logsigmoid(pre_activation)


class FlowPosterior:
    """Base of the flow posteriors: holds the parameter dict; subclasses give the flow.

    ``params["mean"]`` and ``params["log_var"]`` (B, Z) define z = mean + std * eps_T.
    """

    def __init__(self, params: Mapping[str, torch.Tensor]):
        self.params = dict(params)
        if self.params["mean"].ndim != 2 or self.params["log_var"].shape != self.params["mean"].shape:
            raise ValueError("a flow posterior needs 'mean' and 'log_var' of shape (B, Z)")

    @property
    def num_datapoints(self) -> int:
        return self.params["mean"].shape[0]

    @property
    def latent_size(self) -> int:
        return self.params["mean"].shape[1]

    def base_noise(self, num_samples: int, *, generator: torch.Generator | None) -> torch.Tensor:
        """eps_0 ~ N(0, I) of shape (K, B, Z), chunk-consistent (``standard_normal``)."""
        mean = self.params["mean"]
        return standard_normal((num_samples, *mean.shape), generator=generator, dtype=mean.dtype,
                               device=mean.device)

    def to_latent(self, eps: torch.Tensor) -> torch.Tensor:
        """z = mean + std * eps for eps (K, B, Z)."""
        return self.params["mean"] + torch.exp(0.5 * self.params["log_var"]) * eps

    def base_log_prob(self, eps: torch.Tensor) -> torch.Tensor:
        """log q(z_0) for z_0 = mean + std * eps: log N(eps; 0, I) - 1/2 sum log_var; (K, B)."""
        return standard_normal_log_prob(eps) - 0.5 * self.params["log_var"].sum(-1)

    def local_params(self) -> dict[str, torch.Tensor]:
        """Every tensor with the datapoints along dimension 0 (shared ones repeated), detached copies:
        the parameters of the local family that starts exactly at this posterior."""
        shapes = self.param_shapes(self.latent_size, **self.sizes())
        out = {}
        for name, shape in shapes.items():
            value = self.params[name].detach()
            if value.ndim == len(shape):  # shared: repeat for every datapoint
                value = value.expand(self.num_datapoints, *shape)
            out[name] = value.clone()
        return out

    # --- for subclasses --------------------------------------------------------------------------
    @staticmethod
    def param_shapes(latent_size: int, **sizes: int) -> dict[str, tuple[int, ...]]:
        """Per-datapoint shape of every parameter."""
        raise NotImplementedError

    def sizes(self) -> dict[str, int]:
        """The size options (number of steps, hidden width) these parameters imply."""
        raise NotImplementedError


class InvertibleFlowPosterior(FlowPosterior):
    """A flow with an exact density: subclasses give ``flow(eps0) -> (eps_T, log |det|)`` and its
    inverse ``inverse(eps_T) -> eps0`` (closed form or numerical)."""

    def flow(self, eps0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def inverse(self, eps: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rsample_and_log_prob(self, num_samples: int, *, generator: torch.Generator | None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """z (K, B, Z) and log q(z) = log q(z_0) - sum of the steps' log |det|, (K, B)."""
        eps0 = self.base_noise(num_samples, generator=generator)  # (K, B, Z)
        eps, log_det = self.flow(eps0)
        return self.to_latent(eps), self.base_log_prob(eps0) - log_det

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log q(z) at given z (K, B, Z) through the inverse; returns (K, B)."""
        eps0 = self.inverse((z - self.params["mean"]) * torch.exp(-0.5 * self.params["log_var"]))
        _, log_det = self.flow(eps0)
        return self.base_log_prob(eps0) - log_det


class FlowFamily:
    """Local form of a flow family: every parameter free per datapoint, (B, ...) tensors.

    Starts from the prior N(0, I) or a given diagonal Gaussian with the flow at the identity (so it is
    exactly that Gaussian), or from a posterior of the same family (e.g. the flow encoder's output).
    """

    name: str = ""
    posterior_type: type[FlowPosterior] = FlowPosterior
    supports_stl = False  # log q at a given z needs the inverse flow: refined with the plain gradient

    def sizes(self) -> dict[str, int]:
        raise NotImplementedError

    def init_params(
        self, num_datapoints: int, latent_size: int, *, like: torch.Tensor,
        init_from: DiagonalGaussian | FlowPosterior | None = None, generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Parameters ``{name: (B, ...)}``; random hidden-layer weights come from ``generator``."""
        if isinstance(init_from, self.posterior_type):
            params = init_from.local_params()
            if params["mean"].shape != (num_datapoints, latent_size):
                raise ValueError(f"initial posterior has shape {tuple(params['mean'].shape)}, "
                                 f"expected {(num_datapoints, latent_size)}")
            return {k: v.to(like) for k, v in params.items()}
        if isinstance(init_from, FlowPosterior):
            raise TypeError(f"cannot start a local {self.name!r} flow from a {type(init_from).__name__}; "
                            "pass a diagonal Gaussian fitted to it")
        if init_from is None:
            zeros = like.new_zeros(num_datapoints, latent_size)  # (B, Z)
            base = {"mean": zeros, "log_var": zeros.clone()}
        else:
            if tuple(init_from.mean.shape) != (num_datapoints, latent_size):
                raise ValueError(f"initial posterior has shape {tuple(init_from.mean.shape)}, "
                                 f"expected {(num_datapoints, latent_size)}")
            base = {"mean": init_from.mean.detach().to(like).clone(),
                    "log_var": init_from.log_var.detach().to(like).clone()}
        flow = self.identity_params(num_datapoints, latent_size, like=like, generator=generator)
        return {**base, **flow}

    def identity_params(self, num_datapoints: int, latent_size: int, *, like: torch.Tensor,
                        generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """Flow parameters (B, ...) that make the flow the identity (hidden weights random)."""
        raise NotImplementedError

    def posterior(self, params: Mapping[str, torch.Tensor]) -> FlowPosterior:
        return self.posterior_type(params)

    def step_scale(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor | float]:
        """Mean steps in units of the standard deviation (as the FFG); weight matrices' steps divided
        by sqrt(fan-in), so that a step changes a pre-activation by about the step size whatever the
        width; everything else (biases, log-variances) unscaled."""
        scales: dict[str, torch.Tensor | float] = {"mean": torch.exp(0.5 * params["log_var"])}
        for name, value in params.items():
            if name.endswith(("w1", "w2")) or name == "w":
                scales[name] = 1.0 / value.shape[-1]
        return scales


def random_weight(num_datapoints: int, shape: tuple[int, int], *, like: torch.Tensor,
                  generator: torch.Generator | None) -> torch.Tensor:
    """(B, O, I) weights with N(0, 1/I) entries (LeCun initialisation), one matrix per datapoint."""
    w = random_normal((num_datapoints, *shape), generator=generator, dtype=like.dtype, device=like.device,
                      batch_dim=0)  # (B, O, I)
    return w / math.sqrt(shape[1])


class FlowEncoder(nn.Module):
    """Amortized trunk shared by the flow encoders: features h(x) from an MLP, the base N(mean, var)
    from a linear head, and one linear head per flow network giving its first-layer bias from h(x)
    (the flow's other weights are shared parameters). Subclasses add the flow's parameters.

    Parameters
    ----------
    data_size : D
    latent_size : Z
    hidden_sizes : the trunk's hidden widths (paper: (200, 200)); () uses x itself as features
    activation : the trunk's nonlinearity
    trunk : a module mapping x (B, D) to features (B, F), with attribute ``feature_size`` (F), used
        instead of the MLP (e.g. ``gapbench.models.conv.ConvTrunk``); ``hidden_sizes`` is then unused
    """

    def __init__(self, data_size: int, latent_size: int, hidden_sizes: tuple[int, ...] = (200, 200),
                 activation: str = "elu", *, trunk: nn.Module | None = None):
        super().__init__()
        self.data_size = data_size
        self.latent_size = latent_size
        if trunk is not None:
            self.trunk = trunk
        elif hidden_sizes:
            self.trunk: nn.Module = nn.Sequential(mlp([data_size, *hidden_sizes], activation), ACTIVATIONS[activation]())
        else:
            self.trunk = nn.Identity()
        if trunk is not None:
            self.feature_size = int(trunk.feature_size)
        else:
            self.feature_size = hidden_sizes[-1] if hidden_sizes else data_size
        self.base = nn.Linear(self.feature_size, 2 * latent_size)

    def base_params(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Features (B, F) and the base ``{"mean": (B, Z), "log_var": (B, Z)}``."""
        features = self.trunk(x)  # (B, F)
        mean, log_var = self.base(features).chunk(2, dim=-1)  # (B, Z) each
        return features, {"mean": mean, "log_var": log_var}


class ConditionedNets(nn.Module):
    """The amortized form of a set of one-hidden-layer flow networks (Z -> H -> 2Z): shared weights,
    and a first-layer bias per datapoint computed linearly from the encoder's features h(x), which
    is how x conditions the flow (as the context input of Kingma et al., 2016). Output layers start
    at zero, so the flow starts at the identity.

    Parameters
    ----------
    names : the networks' names (parameter prefixes such as ``"c0.v"``)
    feature_size : F, the width of h(x)
    latent_size : Z
    hidden_size : H
    """

    def __init__(self, names: list[str], feature_size: int, latent_size: int, hidden_size: int):
        super().__init__()
        self.names = list(names)
        z, h = latent_size, hidden_size
        self.bias_heads = nn.ModuleDict({_key(n): nn.Linear(feature_size, h) for n in self.names})
        self.weights = nn.ParameterDict()
        for n in self.names:
            self.weights[f"{_key(n)}_w1"] = nn.Parameter(torch.randn(h, z) / math.sqrt(z))
            self.weights[f"{_key(n)}_w2"] = nn.Parameter(torch.zeros(2 * z, h))
            self.weights[f"{_key(n)}_b2"] = nn.Parameter(torch.zeros(2 * z))

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """features (B, F) -> ``{"<net>.b1": (B, H)}`` plus the shared ``w1`` (H, Z), ``w2`` (2Z, H), ``b2`` (2Z,)."""
        params = {}
        for n in self.names:
            params[f"{n}.b1"] = self.bias_heads[_key(n)](features)  # (B, H)
            for part in ("w1", "w2", "b2"):
                params[f"{n}.{part}"] = self.weights[f"{_key(n)}_{part}"]
        return params


def mlp_params(names: list[str], num_datapoints: int, latent_size: int, hidden_size: int, *,
               like: torch.Tensor, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """Local (per-datapoint) parameters of one-hidden-layer networks Z -> H -> 2Z at the identity:
    random first layers, zero output layers."""
    b, z, h = num_datapoints, latent_size, hidden_size
    params = {}
    for n in names:
        params[f"{n}.w1"] = random_weight(b, (h, z), like=like, generator=generator)  # (B, H, Z)
        params[f"{n}.b1"] = like.new_zeros(b, h)
        params[f"{n}.w2"] = like.new_zeros(b, 2 * z, h)
        params[f"{n}.b2"] = like.new_zeros(b, 2 * z)
    return params


def mlp_shapes(names: list[str], latent_size: int, hidden_size: int) -> dict[str, tuple[int, ...]]:
    """Per-datapoint shapes of the networks' parameters."""
    z, h = latent_size, hidden_size
    shapes: dict[str, tuple[int, ...]] = {}
    for n in names:
        shapes.update({f"{n}.w1": (h, z), f"{n}.b1": (h,), f"{n}.w2": (2 * z, h), f"{n}.b2": (2 * z,)})
    return shapes


def _key(name: str) -> str:
    return name.replace(".", "_")  # module and parameter names cannot hold dots
