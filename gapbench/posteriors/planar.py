"""Planar flows (Rezende & Mohamed, 2015, section 4.1).

Each of L layers maps (standardised coordinates, see ``flowbase``)

    f(eps) = eps + u_hat * tanh(w . eps + b),   log |det df/deps| = log |1 + (1 - tanh^2(w . eps + b)) w . u_hat|

and z = mean + std * eps_L. The layer is invertible when w . u_hat >= -1; Rezende & Mohamed (2015,
appendix A.1) enforce it with u_hat = u + (m(w . u) - w . u) w / |w|^2, m(a) = -1 + softplus(a). Here
m(a) = -1 + softplus(a + log(e - 1)), which also satisfies m(a) > -1 and has m(0) = 0, so u = 0 is
exactly the identity. The inverse has no closed form but reduces to one monotone equation in
alpha = w . eps per layer, alpha + (w . u_hat) tanh(alpha + b) = w . f(eps), solved here by bisection.

Parameters (per datapoint; the amortized encoder outputs all of them from x, as Rezende & Mohamed do):
    mean, log_var (Z,);  u (L, Z);  w (L, Z);  b (L,)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gapbench.posteriors.flowbase import FlowEncoder, FlowFamily, InvertibleFlowPosterior
from gapbench.posteriors.noise import random_normal

LOG_E_MINUS_1 = math.log(math.e - 1.0)  # softplus(LOG_E_MINUS_1) = 1


def constrained_u(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """u_hat with w . u_hat > -1 (and u_hat = 0 at u = 0): u, w (..., Z) -> (..., Z)."""
    wu = (w * u).sum(-1, keepdim=True)  # (..., 1)
    m = F.softplus(wu + LOG_E_MINUS_1) - 1.0
    w_sq = (w * w).sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    return u + (m - wu) * w / w_sq


class PlanarFlow(InvertibleFlowPosterior):
    """q(z|x) for B datapoints: a diagonal Gaussian base followed by L planar layers."""

    @staticmethod
    def param_shapes(latent_size: int, *, num_layers: int) -> dict[str, tuple[int, ...]]:
        return {"mean": (latent_size,), "log_var": (latent_size,), "u": (num_layers, latent_size),
                "w": (num_layers, latent_size), "b": (num_layers,)}

    def sizes(self) -> dict[str, int]:
        return {"num_layers": self.params["w"].shape[-2]}

    def flow(self, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """eps_0 (K, B, Z) -> eps_L (K, B, Z) and log |det| (K, B)."""
        u_hat = constrained_u(self.params["u"], self.params["w"])  # (B, L, Z)
        w, b = self.params["w"], self.params["b"]  # (B, L, Z), (B, L)
        wu = (w * u_hat).sum(-1)  # (B, L), >= -1
        log_det = eps.new_zeros(eps.shape[:-1])  # (K, B)
        for layer in range(w.shape[1]):
            t = torch.tanh((eps * w[:, layer]).sum(-1) + b[:, layer])  # (K, B)
            eps = eps + u_hat[:, layer] * t.unsqueeze(-1)  # (K, B, Z)
            log_det = log_det + torch.log(torch.abs(1.0 + (1.0 - t * t) * wu[:, layer]))
        return eps, log_det

    def inverse(self, eps: torch.Tensor, *, num_bisections: int = 200) -> torch.Tensor:
        """eps_L (K, B, Z) -> eps_0, solving each layer's scalar equation by bisection."""
        u_hat = constrained_u(self.params["u"], self.params["w"])  # (B, L, Z)
        w, b = self.params["w"], self.params["b"]
        wu = (w * u_hat).sum(-1)  # (B, L)
        for layer in reversed(range(w.shape[1])):
            target = (eps * w[:, layer]).sum(-1)  # (K, B): alpha + c tanh(alpha + b) = target
            c, bias = wu[:, layer], b[:, layer]  # (B,)
            low, high = target - c.abs() - 1.0, target + c.abs() + 1.0  # the root lies within
            for _ in range(num_bisections):  # the left side is non-decreasing in alpha (c >= -1)
                mid = 0.5 * (low + high)
                is_below = mid + c * torch.tanh(mid + bias) < target
                low, high = torch.where(is_below, mid, low), torch.where(is_below, high, mid)
            alpha = 0.5 * (low + high)
            eps = eps - u_hat[:, layer] * torch.tanh(alpha + bias).unsqueeze(-1)
        return eps



class PlanarFlowFamily(FlowFamily):
    """Local planar flow (``"planar"``): u, w, b and the base free per datapoint.

    Parameters
    ----------
    num_layers : L planar layers
    """

    name = "planar"
    posterior_type = PlanarFlow

    def __init__(self, num_layers: int = 10):
        self.num_layers = num_layers

    def sizes(self) -> dict[str, int]:
        return {"num_layers": self.num_layers}

    def identity_params(self, num_datapoints: int, latent_size: int, *, like: torch.Tensor,
                        generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        shape = (num_datapoints, self.num_layers, latent_size)
        w = random_normal(shape, generator=generator, dtype=like.dtype, device=like.device,
                          batch_dim=0) / math.sqrt(latent_size)  # (B, L, Z)
        return {"u": like.new_zeros(shape), "w": w, "b": like.new_zeros(num_datapoints, self.num_layers)}


class PlanarFlowEncoder(FlowEncoder):
    """Amortized planar flow: a linear head maps the trunk's features to every layer's u, w, b
    (Rezende & Mohamed, 2015). Starts as the diagonal-Gaussian encoder (u = 0).

    Parameters
    ----------
    data_size, latent_size, hidden_sizes, activation, trunk : as :class:`FlowEncoder`
    num_layers : L
    """

    def __init__(self, data_size: int, latent_size: int, hidden_sizes: tuple[int, ...] = (200, 200),
                 activation: str = "elu", *, num_layers: int = 10,
                 trunk: nn.Module | None = None):
        super().__init__(data_size, latent_size, hidden_sizes, activation, trunk=trunk)
        self.num_layers = num_layers
        z, layers = latent_size, num_layers
        self.head = nn.Linear(self.feature_size, layers * (2 * z + 1))
        with torch.no_grad():  # u = 0 and b = 0 for every x; w starts random, the same for every x
            self.head.weight.zero_()
            self.head.bias.zero_()
            self.head.bias[layers * z:2 * layers * z] = torch.randn(layers * z) / math.sqrt(z)

    def forward(self, x: torch.Tensor) -> PlanarFlow:
        """x (B, D) -> the posterior for each datapoint."""
        features, params = self.base_params(x)
        z, layers = self.latent_size, self.num_layers
        out = self.head(features)  # (B, L (2Z + 1))
        params["u"] = out[:, :layers * z].reshape(-1, layers, z)  # (B, L, Z)
        params["w"] = out[:, layers * z:2 * layers * z].reshape(-1, layers, z)  # (B, L, Z)
        params["b"] = out[:, 2 * layers * z:]  # (B, L)
        return PlanarFlow(params)
