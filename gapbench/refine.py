"""Per-datapoint optimisation of a local posterior, batched over datapoints.

For B datapoints with free parameters phi_b, maximise sum_b ELBO_b(phi_b). The gradient of the sum
with respect to phi_b is the gradient of ELBO_b alone, and Adam updates each element with its own
moments, so this is B independent optimisations run in one batch. Every datapoint carries its own
learning rate, its own convergence test and its own step count; nothing couples datapoints (no
global clipping, no shared scheduler). Datapoints that stop are removed from the batch, so the cost
of a step falls as datapoints converge.

The procedure, per datapoint:
  * each step draws ``num_samples`` z ~ q and takes an Adam step on the ELBO estimate; the gradient
    is the plain reparameterisation gradient or the "sticking the landing" path gradient (Roeder,
    Wu & Duvenaud, 2017), whose variance vanishes as q approaches the posterior;
  * every ``check_every`` steps the mean ELBO estimate over that window is compared with the best
    window so far; a window that does not beat it by ``min_improvement`` counts as a bad check and
    multiplies the datapoint's learning rate by ``lr_decay``; ``patience`` consecutive bad checks
    stop the datapoint (so does ``max_steps``).
Cremer, Li & Duvenaud (2018) use Adam with lr 1e-3 from the prior, 50 samples, checks every 100 steps,
no decay, and stop after more than 10 consecutive bad checks: ``patience=11, lr_decay=1``.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import torch

from .posteriors import LocalFamily

GRADIENTS = ("stl", "reparam")


class ActiveSet(NamedTuple):
    """State of the datapoints still being optimised, compacted to the A active rows."""

    index: torch.Tensor  # (A,) positions in the original batch
    params: dict[str, torch.Tensor]  # each (A, ...)
    exp_avg: dict[str, torch.Tensor]  # Adam first moments, like params
    exp_avg_sq: dict[str, torch.Tensor]  # Adam second moments, like params
    learning_rate: torch.Tensor  # (A,)
    window_sum: torch.Tensor  # (A,) float64, sum of per-step ELBO estimates since the last check
    best: torch.Tensor  # (A,) float64, best window mean so far
    num_bad_checks: torch.Tensor  # (A,) consecutive checks without improvement


class RefineResult(NamedTuple):
    """Outcome of refinement for B datapoints.

    params : the optimised parameters, each (B, ...)
    num_steps : (B,) Adam steps each datapoint took
    is_converged : (B,) True where the convergence test stopped it, False where max_steps did
    final_learning_rate : (B,)
    history : (num_checks, B) float64 window-mean ELBO at each check; NaN after a datapoint stopped
    """

    params: dict[str, torch.Tensor]
    num_steps: torch.Tensor
    is_converged: torch.Tensor
    final_learning_rate: torch.Tensor
    history: torch.Tensor


def _objective(model, family: LocalFamily, params: Mapping[str, torch.Tensor], x: torch.Tensor, *,
               num_samples: int, gradient: str, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable surrogate (A,) whose gradient is the ELBO gradient, and the ELBO estimate (A,)."""
    posterior = family.posterior(params)
    z, log_q = posterior.rsample_and_log_prob(num_samples, generator=generator)  # (S, A, Z), (S, A)
    log_joint = model.log_prior(z) + model.log_likelihood(x, z)  # (S, A)
    estimate = (log_joint - log_q).mean(0).detach()  # (A,)
    if gradient == "stl":
        frozen = family.posterior({k: v.detach() for k, v in params.items()})
        log_q = frozen.log_prob(z)  # (S, A): only the path through z carries gradient
    return (log_joint - log_q).mean(0), estimate


def refine_step(model, family: LocalFamily, x: torch.Tensor, state: ActiveSet, *, step: int,
                num_samples: int, gradient: str, betas: tuple[float, float] = (0.9, 0.999),
                eps: float = 1e-8, generator: torch.Generator | None) -> tuple[ActiveSet, torch.Tensor]:
    """One Adam ascent step on the ELBO for the active datapoints.

    Parameters
    ----------
    x : (A, D), the active datapoints
    step : 1-based step number (all active datapoints have taken the same number of steps)

    Returns
    -------
    the new state and the ELBO estimate at the old parameters, (A,)
    """
    params = {k: v.detach().requires_grad_(True) for k, v in state.params.items()}
    surrogate, estimate = _objective(model, family, params, x, num_samples=num_samples,
                                     gradient=gradient, generator=generator)
    grads = torch.autograd.grad(surrogate.sum(), list(params.values()))
    beta1, beta2 = betas
    new_params, new_m, new_v = {}, {}, {}
    for (name, value), grad in zip(params.items(), grads):
        grad = -grad  # ascent on the ELBO
        m = state.exp_avg[name].mul(beta1).add_(grad, alpha=1 - beta1)
        v = state.exp_avg_sq[name].mul(beta2).addcmul_(grad, grad, value=1 - beta2)
        m_hat = m / (1 - beta1**step)
        v_hat = v / (1 - beta2**step)
        lr = state.learning_rate.view(-1, *([1] * (value.ndim - 1)))  # (A, 1, ...)
        new_params[name] = value.detach() - lr * m_hat / (v_hat.sqrt() + eps)
        new_m[name], new_v[name] = m, v
    state = state._replace(params=new_params, exp_avg=new_m, exp_avg_sq=new_v,
                           window_sum=state.window_sum + estimate.to(torch.float64))
    return state, estimate


def _check(state: ActiveSet, *, check_every: int, min_improvement: float,
           lr_decay: float) -> tuple[ActiveSet, torch.Tensor]:
    """Apply the convergence test; returns the updated state and the window means (A,)."""
    window_mean = state.window_sum / check_every
    improved = window_mean > state.best + min_improvement  # (A,)
    best = torch.where(improved, window_mean, state.best)
    num_bad = torch.where(improved, torch.zeros_like(state.num_bad_checks), state.num_bad_checks + 1)
    lr = torch.where(improved, state.learning_rate, state.learning_rate * lr_decay)
    state = state._replace(best=best, num_bad_checks=num_bad, learning_rate=lr,
                           window_sum=torch.zeros_like(state.window_sum))
    return state, window_mean


def _select(state: ActiveSet, keep: torch.Tensor) -> ActiveSet:
    """Keep the rows where ``keep`` (A,) is True."""
    def rows(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v[keep] for k, v in d.items()}
    return ActiveSet(state.index[keep], rows(state.params), rows(state.exp_avg), rows(state.exp_avg_sq),
                     state.learning_rate[keep], state.window_sum[keep], state.best[keep],
                     state.num_bad_checks[keep])


def refine(model, x: torch.Tensor, *, family: LocalFamily, init_params: Mapping[str, torch.Tensor],
           num_samples: int, learning_rate: float, max_steps: int, check_every: int, patience: int,
           lr_decay: float = 1.0, min_improvement: float = 0.0, gradient: str = "stl",
           generator: torch.Generator | None,
           callback: Callable[[int, int], None] | None = None) -> RefineResult:
    """Optimise a local posterior for each of B datapoints, all at once.

    Parameters
    ----------
    model : has ``log_prior(z)`` and ``log_likelihood(x, z)``; its parameters are not changed
    x : (B, D)
    family : the local variational family (e.g. ``DiagonalGaussianFamily()``)
    init_params : starting parameters, each (B, ...) (from ``family.init_params``)
    num_samples : samples of z per datapoint per step
    learning_rate : initial Adam step size, the same for every datapoint
    max_steps : hard limit on steps per datapoint
    check_every : steps per convergence window
    patience : consecutive windows without improvement that stop a datapoint
    lr_decay : factor applied to a datapoint's learning rate after each bad window (1: none)
    min_improvement : nats a window mean must beat the best by to count as an improvement
    gradient : "stl" (sticking the landing) or "reparam"
    generator : random stream (keyword-only)
    callback : called as ``callback(step, num_active)`` after each step, e.g. for a progress bar

    Returns
    -------
    RefineResult with per-datapoint parameters, step counts and convergence flags.
    """
    if gradient not in GRADIENTS:
        raise ValueError(f"unknown gradient estimator {gradient!r}; choose one of {GRADIENTS}")
    for name, value in {"num_samples": num_samples, "max_steps": max_steps, "check_every": check_every,
                        "patience": patience}.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if not learning_rate > 0 or not 0 < lr_decay <= 1:
        raise ValueError(f"need learning_rate > 0 and 0 < lr_decay <= 1, got {learning_rate}, {lr_decay}")
    num_datapoints = x.shape[0]
    device = x.device
    out_params = {k: v.detach().clone() for k, v in init_params.items()}
    num_steps = torch.zeros(num_datapoints, dtype=torch.long, device=device)
    is_converged = torch.zeros(num_datapoints, dtype=torch.bool, device=device)
    final_lr = torch.full((num_datapoints,), float(learning_rate), device=device)
    history: list[torch.Tensor] = []

    zeros64 = torch.zeros(num_datapoints, dtype=torch.float64, device=device)
    state = ActiveSet(
        index=torch.arange(num_datapoints, device=device),
        params={k: v.clone() for k, v in out_params.items()},
        exp_avg={k: torch.zeros_like(v) for k, v in out_params.items()},
        exp_avg_sq={k: torch.zeros_like(v) for k, v in out_params.items()},
        learning_rate=final_lr.clone(),
        window_sum=zeros64.clone(),
        best=torch.full_like(zeros64, -torch.inf),
        num_bad_checks=torch.zeros(num_datapoints, dtype=torch.long, device=device),
    )
    x_active = x
    step = 0
    while state.index.numel() > 0 and step < max_steps:
        step += 1
        state, _ = refine_step(model, family, x_active, state, step=step, num_samples=num_samples,
                               gradient=gradient, generator=generator)
        is_check = step % check_every == 0
        if is_check:
            state, window_mean = _check(state, check_every=check_every,
                                        min_improvement=min_improvement, lr_decay=lr_decay)
            row = torch.full((num_datapoints,), torch.nan, dtype=torch.float64, device=device)
            row[state.index] = window_mean
            history.append(row)
        stop = state.num_bad_checks >= patience if is_check else None
        if step == max_steps:
            stop = torch.ones_like(state.index, dtype=torch.bool)
        if stop is not None and bool(stop.any()):
            done = state.index[stop]
            for name, value in state.params.items():
                out_params[name][done] = value[stop]
            num_steps[done] = step
            is_converged[done] = state.num_bad_checks[stop] >= patience
            final_lr[done] = state.learning_rate[stop]
            state = _select(state, ~stop)
            x_active = x[state.index]
        if callback is not None:
            callback(step, int(state.index.numel()))
    history_tensor = (torch.stack(history) if history
                      else torch.empty(0, num_datapoints, dtype=torch.float64, device=device))
    return RefineResult(out_params, num_steps, is_converged, final_lr, history_tensor)
