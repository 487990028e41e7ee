"""The flow of Cremer, Li & Duvenaud (2018): an auxiliary variable v and affine coupling steps.

Sampling (standardised coordinates, see ``flowbase``): eps_0 ~ N(0, I), v_0 ~ q(v_0 | eps_0, x), then
for t = 1..T

    v <- v * g_v(eps) + m_v(eps)            g = 2 sigmoid(a): a gate in (0, 2), 1 at a = 0
    eps <- eps * g_e(v) + m_e(v)

and z = mean + std * eps_T. The map (eps_0, v_0) -> (eps_T, v_T) is invertible in closed form and
log |det| = sum_t sum_j [log g_v + log g_e] (each step is triangular). With a reverse model
r(v_T | z_T, x), the ELBO uses

    log q~(z_T) = log q(z_0) + log q(v_0 | z_0, x) - log |det| - log r(v_T | z_T, x),

whose expectation over v given z_T is log q(z_T | x) + KL(q(v_T|z_T, x) || r(v_T|z_T, x)) >= log q(z_T | x):
it over-estimates the marginal's log-density by the reverse model's error, so E[log p(x, z_T) - log q~]
is at most the ELBO of the marginal and still a lower bound on log p(x) (Agakov & Barber, 2004;
Salimans, Kingma & Welling, 2015; Ranganath, Tran & Blei, 2016). Cremer et al. (2018) use two
coupling steps with tanh networks (their code: width 100 in approx_posteriors_v6 and
optimize_local, 50 in distributions.Flow, which also takes q(v_0) = N(0, I) and r(v_T | z_T)
without x). Here q(v_0 | z_0, x) and r(v_T | z_T, x) both depend on z and x, and every network m, g,
q(v_0|.), r(v_T|.) has one tanh hidden layer, conditioned on x through a per-datapoint first-layer
bias (amortized) or free per-datapoint weights (local).

Parameters (per datapoint; shared in the amortized form except the base and the first-layer biases):
    mean, log_var            (Z,)    the base q(z_0) = N(mean, diag(exp(log_var)))
    qv.{w1,b1,w2,b2}         (H, Z), (H,), (2Z, H), (2Z,)   q(v_0 | eps_0): mean and log-variance of v_0
    c{t}.v.*, c{t}.e.*       same shapes                    step t: shift and gate pre-activation
    r.*                      same shapes                    r(v_T | eps_T): mean and log-variance
With the coupling networks' output layers (w2, b2) at zero the flow is the identity, and with r the
same network as q(v_0|.) the two cancel, so log q~(z) is exactly the base diagonal Gaussian's
log-density; flows start there.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from gapbench.models.likelihoods import gaussian_log_prob
from gapbench.posteriors.flowbase import (ConditionedNets, FlowEncoder, FlowFamily, FlowPosterior, linear, log_gate,
    mlp_params, mlp_shapes, random_weight)
from gapbench.posteriors.gaussian import LOG_2PI
from gapbench.posteriors.noise import standard_normal

_STEP = re.compile(r"c(\d+)\.v\.w1")


def net_names(num_steps: int) -> list[str]:
    """The networks of a T-step flow, in the order they run."""
    return ["qv", *[f"c{t}.{side}" for t in range(num_steps) for side in ("v", "e")], "r"]


class AuxiliaryCouplingFlow(FlowPosterior):
    """q(z|x) for B datapoints: the auxiliary coupling flow (see the module docstring)."""

    @staticmethod
    def param_shapes(latent_size: int, *, num_steps: int, hidden_size: int) -> dict[str, tuple[int, ...]]:
        return {"mean": (latent_size,), "log_var": (latent_size,),
                **mlp_shapes(net_names(num_steps), latent_size, hidden_size)}

    def sizes(self) -> dict[str, int]:
        num_steps = sum(1 for name in self.params if _STEP.fullmatch(name))
        return {"num_steps": num_steps, "hidden_size": self.params["qv.w1"].shape[-2]}

    def _net(self, name: str, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One tanh hidden layer: inputs (K, B, Z) -> two outputs (K, B, Z) each."""
        p = self.params
        hidden = torch.tanh(linear(inputs, p[f"{name}.w1"], p[f"{name}.b1"]))  # (K, B, H)
        first, second = linear(hidden, p[f"{name}.w2"], p[f"{name}.b2"]).chunk(2, dim=-1)  # (K, B, Z) each
        return first, second

    def couple(self, eps: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(eps_0, v_0) -> (eps_T, v_T) and log |det| of the map; all (K, B, Z) except log_det (K, B)."""
        log_det = eps.new_zeros(eps.shape[:-1])  # (K, B)
        for t in range(self.sizes()["num_steps"]):
            shift, pre = self._net(f"c{t}.v", eps)
            log_g = log_gate(pre)  # (K, B, Z)
            v = v * torch.exp(log_g) + shift
            log_det = log_det + log_g.sum(-1)
            shift, pre = self._net(f"c{t}.e", v)
            log_g = log_gate(pre)
            eps = eps * torch.exp(log_g) + shift
            log_det = log_det + log_g.sum(-1)
        return eps, v, log_det

    def uncouple(self, eps: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The inverse of :meth:`couple`: (eps_T, v_T) -> (eps_0, v_0), and log |det| of the forward map."""
        log_det = eps.new_zeros(eps.shape[:-1])  # (K, B)
        for t in reversed(range(self.sizes()["num_steps"])):
            shift, pre = self._net(f"c{t}.e", v)
            log_g = log_gate(pre)
            eps = (eps - shift) * torch.exp(-log_g)
            log_det = log_det + log_g.sum(-1)
            shift, pre = self._net(f"c{t}.v", eps)
            log_g = log_gate(pre)
            v = (v - shift) * torch.exp(-log_g)
            log_det = log_det + log_g.sum(-1)
        return eps, v, log_det

    def sample_joint(self, num_samples: int, *, generator: torch.Generator | None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """z_T, v_T, log q(z_T, v_T) and log r(v_T | z_T): shapes (K, B, Z), (K, B, Z), (K, B), (K, B)."""
        mean = self.params["mean"]
        size = self.latent_size
        noise = standard_normal((num_samples, self.num_datapoints, 2 * size), generator=generator,
                                dtype=mean.dtype, device=mean.device)  # (K, B, 2Z), chunk-consistent
        eps0, eta = noise[..., :size], noise[..., size:]  # (K, B, Z) each
        v_mean, v_log_var = self._net("qv", eps0)
        v0 = v_mean + torch.exp(0.5 * v_log_var) * eta  # (K, B, Z)
        log_q_v0 = -0.5 * (eta.square() + v_log_var + LOG_2PI).sum(-1)  # log N(v0; v_mean, var), (K, B)
        eps, v, log_det = self.couple(eps0, v0)
        log_q_joint = self.base_log_prob(eps0) + log_q_v0 - log_det  # (K, B)
        r_mean, r_log_var = self._net("r", eps)
        return self.to_latent(eps), v, log_q_joint, gaussian_log_prob(r_mean, r_log_var, v)

    def rsample_and_log_prob(self, num_samples: int, *, generator: torch.Generator | None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """z (K, B, Z) and log q~(z) = log q(z_T, v_T) - log r(v_T | z_T), (K, B)."""
        z, _, log_q_joint, log_r = self.sample_joint(num_samples, generator=generator)
        return z, log_q_joint - log_r

    def rsample_and_log_prob_stl(self, num_samples: int, *, frozen: "AuxiliaryCouplingFlow",
                                 generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For the "sticking the landing" gradient (Roeder, Wu & Duvenaud, 2017): z, log q~(z), and the
        surrogate log q(z_T, v_T) under the ``frozen`` (detached) parameters minus log r(v_T|z_T) under
        the live ones, all (K, B) but z. The objective is E[log p(x, z) + log r(v|z) - log q(z, v)]: the
        score of q(z, v), whose mean is zero, is dropped; r belongs to the target and keeps its gradient.
        """
        z, v, log_q_joint, log_r = self.sample_joint(num_samples, generator=generator)
        log_q_joint_path, _ = frozen.joint_log_prob(z, v, with_r=False)
        return z, log_q_joint - log_r, log_q_joint_path - log_r

    def joint_log_prob(self, z: torch.Tensor, v: torch.Tensor, *, with_r: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """log q(z_T, v_T) and log r(v_T | z_T) (None unless ``with_r``) at given z, v (K, B, Z), by
        inverting the flow in closed form."""
        eps = (z - self.params["mean"]) * torch.exp(-0.5 * self.params["log_var"])  # (K, B, Z)
        eps0, v0, log_det = self.uncouple(eps, v)
        v_mean, v_log_var = self._net("qv", eps0)
        log_q_joint = self.base_log_prob(eps0) + gaussian_log_prob(v_mean, v_log_var, v0) - log_det
        if not with_r:
            return log_q_joint, None
        r_mean, r_log_var = self._net("r", eps)
        return log_q_joint, gaussian_log_prob(r_mean, r_log_var, v)


class AuxiliaryFlowFamily(FlowFamily):
    """Local auxiliary coupling flow (``"flow"``): every parameter free per datapoint. Supports the
    "sticking the landing" gradient through the closed-form inverse (see
    :meth:`AuxiliaryCouplingFlow.rsample_and_log_prob_stl`).

    Parameters
    ----------
    num_steps : coupling steps T (Cremer et al., 2018: 2)
    hidden_size : width of every network's hidden layer
    """

    name = "flow"
    posterior_type = AuxiliaryCouplingFlow
    supports_stl = True

    def __init__(self, num_steps: int = 2, hidden_size: int = 100):
        self.num_steps = num_steps
        self.hidden_size = hidden_size

    def sizes(self) -> dict[str, int]:
        return {"num_steps": self.num_steps, "hidden_size": self.hidden_size}

    def identity_params(self, num_datapoints: int, latent_size: int, *, like: torch.Tensor,
                        generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        params = mlp_params(net_names(self.num_steps), num_datapoints, latent_size, self.hidden_size,
                            like=like, generator=generator)
        # q(v_0|eps_0) random, and r(v_T|eps_T) the same network: exact at the identity, and v_0 carries
        # information about eps_0 from the start (with q(v_0) = N(0, I) the identity is a saddle point:
        # flipping the sign of v leaves the ELBO unchanged, so the coupling weights get no gradient)
        params["qv.w2"] = random_weight(num_datapoints, (2 * latent_size, self.hidden_size), like=like,
                                        generator=generator)
        for part in ("w1", "b1", "w2", "b2"):
            params[f"r.{part}"] = params[f"qv.{part}"].clone()
        return params


class AuxiliaryFlowEncoder(FlowEncoder):
    """Amortized auxiliary coupling flow: the trunk's features give the base and every network's
    first-layer bias; the networks' other weights are shared. Starts as the diagonal-Gaussian encoder
    (output layers at zero).

    Parameters
    ----------
    data_size, latent_size, hidden_sizes, activation, trunk : as :class:`FlowEncoder`
    num_steps : coupling steps (paper: 2)
    flow_hidden : hidden width of the flow's networks (paper: 100)
    """

    def __init__(self, data_size: int, latent_size: int, hidden_sizes: tuple[int, ...] = (200, 200),
                 activation: str = "elu", *, num_steps: int = 2, flow_hidden: int = 100,
                 trunk: nn.Module | None = None):
        super().__init__(data_size, latent_size, hidden_sizes, activation, trunk=trunk)
        self.num_steps = num_steps
        self.flow_hidden = flow_hidden
        self.nets = ConditionedNets(net_names(num_steps), self.feature_size, latent_size, flow_hidden)
        with torch.no_grad():  # q(v_0|.) random and r(v_T|.) the same network (see AuxiliaryFlowFamily)
            self.nets.weights["qv_w2"].copy_(torch.randn(2 * latent_size, flow_hidden) / flow_hidden**0.5)
            for part in ("w1", "w2", "b2"):
                self.nets.weights[f"r_{part}"].copy_(self.nets.weights[f"qv_{part}"])
            self.nets.bias_heads["r"].load_state_dict(self.nets.bias_heads["qv"].state_dict())

    def forward(self, x: torch.Tensor) -> AuxiliaryCouplingFlow:
        """x (B, D) -> the posterior for each datapoint."""
        features, params = self.base_params(x)  # (B, F), base (B, Z)
        return AuxiliaryCouplingFlow({**params, **self.nets(features)})
