"""Adam with a step size per row: A independent optimisations in one batch of tensors.

Every parameter tensor holds A rows (one per datapoint) and every row has its own learning rate;
Adam's moments are per element, so no row's update depends on another's (Kingma & Ba, 2015):

    m_t = beta1 m_{t-1} + (1 - beta1) g_t,     v_t = beta2 v_{t-1} + (1 - beta2) g_t^2
    theta_t = theta_{t-1} + lr * scale * m_hat / (sqrt(v_hat) + eps),
    m_hat = m_t / (1 - beta1^t),  v_hat = v_t / (1 - beta2^t)

an *ascent* step (g is the gradient of the objective to maximise; the moments are those of descent
on its negative, negated, bit for bit), with ``scale`` an optional per-element factor
(``LocalFamily.step_scale``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch


class AdamState(NamedTuple):
    """Adam's state for A rows of parameters."""

    exp_avg: dict[str, torch.Tensor]  # first moments m, each like its parameter (A, ...)
    exp_avg_sq: dict[str, torch.Tensor]  # second moments v, each like its parameter (A, ...)
    learning_rate: torch.Tensor  # (A,) each row's step size


def adam_init(params: Mapping[str, torch.Tensor], learning_rate: torch.Tensor) -> AdamState:
    """Zero moments for ``params`` (each (A, ...)) and the step sizes ``learning_rate`` (A,)."""
    return AdamState(exp_avg={k: torch.zeros_like(v) for k, v in params.items()},
                     exp_avg_sq={k: torch.zeros_like(v) for k, v in params.items()},
                     learning_rate=learning_rate)


def adam_step(params: Mapping[str, torch.Tensor], grads: Sequence[torch.Tensor], state: AdamState, *, step: int,
              scales: Mapping[str, torch.Tensor | float], betas: tuple[float, float] = (0.9, 0.999),
              eps: float = 1e-8) -> tuple[dict[str, torch.Tensor], AdamState]:
    """One Adam ascent step for every row (module docstring); returns the new parameters and state.

    Parameters
    ----------
    params : each (A, ...); not changed
    grads : the gradients of the objective, in the order of ``params``
    state : the moments and step sizes; its moment buffers are updated in place and returned in the
        new state (a local flow holds ~10^5 parameters per datapoint, so a batched step is bound by
        passes over memory and every fresh buffer counts): do not use ``state`` after the call
    step : the 1-based step number t, the same for every row
    scales : per-element factors of the update by parameter name (missing names: 1)
    """
    beta1, beta2 = betas
    new_params, new_m, new_v = {}, {}, {}
    for (name, value), grad in zip(params.items(), grads):
        m = state.exp_avg[name].mul_(beta1).add_(grad, alpha=1 - beta1)
        v = state.exp_avg_sq[name].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        lr = state.learning_rate.view(-1, *([1] * (value.ndim - 1))) / (1 - beta1**step)  # (A, 1, ...)
        # lr * m / (sqrt(v_hat) + eps), in place on one fresh buffer
        update = v.sqrt().div_((1 - beta2**step) ** 0.5).add_(eps).reciprocal_().mul_(m).mul_(lr)
        if name in scales:
            update.mul_(scales[name])
        new_params[name] = update.add_(value.detach())  # value + update (ascent)
        new_m[name], new_v[name] = m, v
    return new_params, state._replace(exp_avg=new_m, exp_avg_sq=new_v)
