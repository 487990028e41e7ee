"""Inverse autoregressive flow (Kingma, Salimans, Jozefowicz, Chen, Sutskever & Welling, 2016).

Each of T steps maps (standardised coordinates, see ``flowbase``)

    [m, a] = MADE(eps)                     m_i, a_i depend on eps_<i only (in the step's ordering)
    eps <- eps * g + m,   g = 2 sigmoid(a)   (a gate in (0, 2), exactly 1 at a = 0)
    log |det| = sum_i log g_i              (the Jacobian is triangular)

and z = mean + std * eps_T. Kingma et al. (2016, eq. 10) write the step as mu + sigma * eps and
propose sigmoid gates for stability; the doubled sigmoid keeps the gate bounded and makes zero
output weights the identity. The ordering is reversed after every step, as they do. MADE (Germain,
Gregor, Murray & Larochelle, 2015) is one tanh hidden layer of width H with masks: input i has degree
d_i (its position in the ordering), hidden unit k degree m_k in 1..Z-1, and a weight is kept when
m_k >= d_i (input to hidden) or d_j > m_k (hidden to output j). The amortized form conditions every
step on x through a per-datapoint first-layer bias, a linear function of the encoder's features (the
context h of Kingma et al., 2016).

Parameters (per datapoint; shared in the amortized form except the base and the first-layer biases):
    mean, log_var (Z,);  s{t}.w1 (H, Z), s{t}.b1 (H,), s{t}.w2 (2Z, H), s{t}.b2 (2Z,)  for t < T
The inverse runs Z passes per step (output i is exact after d_i passes).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from gapbench.posteriors.flowbase import (ConditionedNets, FlowEncoder, FlowFamily, InvertibleFlowPosterior, linear,
    log_gate, mlp_params, mlp_shapes)

_STEP = re.compile(r"s(\d+)\.w1")


def step_names(num_steps: int) -> list[str]:
    return [f"s{t}" for t in range(num_steps)]


def made_masks(latent_size: int, hidden_size: int, *, reverse: bool, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MADE masks for one hidden layer: (H, Z) input-to-hidden and (2Z, H) hidden-to-output.

    The outputs are two blocks of Z (shift, gate), each output j with the degree of variable j.
    """
    degrees = torch.arange(1, latent_size + 1, device=device)  # (Z,) degree of each variable
    if reverse:
        degrees = degrees.flip(0)
    hidden = torch.arange(hidden_size, device=device) % max(latent_size - 1, 1) + 1  # (H,) in 1..Z-1
    into_hidden = hidden[:, None] >= degrees[None, :]  # (H, Z)
    out_degrees = torch.cat([degrees, degrees])  # (2Z,)
    into_output = out_degrees[:, None] > hidden[None, :]  # (2Z, H)
    return into_hidden.to(dtype), into_output.to(dtype)


class InverseAutoregressiveFlow(InvertibleFlowPosterior):
    """q(z|x) for B datapoints: a diagonal Gaussian base followed by T IAF steps."""

    @staticmethod
    def param_shapes(latent_size: int, *, num_steps: int, hidden_size: int) -> dict[str, tuple[int, ...]]:
        return {"mean": (latent_size,), "log_var": (latent_size,),
                **mlp_shapes(step_names(num_steps), latent_size, hidden_size)}

    def sizes(self) -> dict[str, int]:
        num_steps = sum(1 for name in self.params if _STEP.fullmatch(name))
        return {"num_steps": num_steps, "hidden_size": self.params["s0.w1"].shape[-2]}

    def _made(self, step: int, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shift and log-gate of step ``step`` at eps (K, B, Z); both (K, B, Z)."""
        p = self.params
        w1, w2 = p[f"s{step}.w1"], p[f"s{step}.w2"]
        mask1, mask2 = made_masks(self.latent_size, w1.shape[-2], reverse=step % 2 == 1, dtype=w1.dtype,
                                  device=w1.device)
        hidden = torch.tanh(linear(eps, w1 * mask1, p[f"s{step}.b1"]))  # (K, B, H)
        shift, pre = linear(hidden, w2 * mask2, p[f"s{step}.b2"]).chunk(2, dim=-1)  # (K, B, Z) each
        return shift, log_gate(pre)

    def flow(self, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """eps_0 (K, B, Z) -> eps_T (K, B, Z) and log |det| (K, B)."""
        log_det = eps.new_zeros(eps.shape[:-1])  # (K, B)
        for step in range(self.sizes()["num_steps"]):
            shift, log_g = self._made(step, eps)
            eps = eps * torch.exp(log_g) + shift
            log_det = log_det + log_g.sum(-1)
        return eps, log_det

    def inverse(self, eps: torch.Tensor) -> torch.Tensor:
        """eps_T (K, B, Z) -> eps_0: per step, Z fixed-point passes of x = (y - m(x)) / g(x)."""
        for step in reversed(range(self.sizes()["num_steps"])):
            target, x = eps, eps
            for _ in range(self.latent_size):
                shift, log_g = self._made(step, x)
                x = (target - shift) * torch.exp(-log_g)
            eps = x
        return eps



class IAFFamily(FlowFamily):
    """Local IAF (``"iaf"``): every MADE weight free per datapoint.

    Parameters
    ----------
    num_steps : T
    hidden_size : H, MADE's hidden width
    """

    name = "iaf"
    posterior_type = InverseAutoregressiveFlow

    def __init__(self, num_steps: int = 2, hidden_size: int = 100):
        self.num_steps = num_steps
        self.hidden_size = hidden_size

    def sizes(self) -> dict[str, int]:
        return {"num_steps": self.num_steps, "hidden_size": self.hidden_size}

    def identity_params(self, num_datapoints: int, latent_size: int, *, like: torch.Tensor,
                        generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        return mlp_params(step_names(self.num_steps), num_datapoints, latent_size, self.hidden_size,
                          like=like, generator=generator)


class IAFEncoder(FlowEncoder):
    """Amortized IAF: the trunk's features give the base and each step's first-layer bias (the
    context); MADE weights are shared. Starts as the diagonal-Gaussian encoder.

    Parameters
    ----------
    data_size, latent_size, hidden_sizes, activation, trunk : as :class:`FlowEncoder`
    num_steps : T
    flow_hidden : MADE's hidden width H
    """

    def __init__(self, data_size: int, latent_size: int, hidden_sizes: tuple[int, ...] = (200, 200),
                 activation: str = "elu", *, num_steps: int = 2, flow_hidden: int = 100,
                 trunk: nn.Module | None = None):
        super().__init__(data_size, latent_size, hidden_sizes, activation, trunk=trunk)
        self.num_steps = num_steps
        self.flow_hidden = flow_hidden
        self.nets = ConditionedNets(step_names(num_steps), self.feature_size, latent_size, flow_hidden)

    def forward(self, x: torch.Tensor) -> InverseAutoregressiveFlow:
        """x (B, D) -> the posterior for each datapoint."""
        features, params = self.base_params(x)  # (B, F), base (B, Z)
        return InverseAutoregressiveFlow({**params, **self.nets(features)})
