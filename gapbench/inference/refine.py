"""Per-datapoint optimisation of a local posterior, batched over datapoints.

For B datapoints with free parameters phi_b, maximise sum_b ELBO_b(phi_b). The gradient of the sum
with respect to phi_b is the gradient of ELBO_b alone, and Adam updates each element with its own
moments, so this is B independent optimisations run in one batch. Every datapoint carries its own
learning rate, its own convergence test and its own step count; nothing couples datapoints (no
global clipping, no shared scheduler). Datapoints that stop are removed from the batch, so the cost
of a step falls as datapoints converge. A datapoint whose ELBO estimate or parameters stop being finite
stops at once, keeps its last parameters with a finite estimate and is flagged (``is_diverged``); the
others go on, independently as always.

The procedure, per datapoint:
  * each step draws ``num_samples`` z ~ q and takes an Adam step on the ELBO estimate; the gradient
    is the plain reparameterisation gradient or the "sticking the landing" path gradient (Roeder,
    Wu & Duvenaud, 2017), whose variance vanishes as q approaches the posterior; the family may
    scale the steps per element (``LocalFamily.step_scale``: the FFG takes mean steps in units of
    its standard deviation);
  * every ``check_every`` steps a convergence test decides whether the datapoint improved; a check
    without improvement multiplies its learning rate by ``lr_decay``, and ``patience`` such checks
    in a row stop it (so does ``max_steps``). Two tests:
      - ``"window"``: the mean ELBO estimate over the window must beat the best window so far by
        ``min_improvement``. Simple, but a window mean is noisy (its noise is that of log w over
        num_samples * check_every draws), and slow progress under noise looks like convergence;
      - ``"paired"``: the candidate, the average of the window's iterates (Polyak & Juditsky, 1992:
        averaging removes most of the jitter a large step size leaves), is compared with the anchor
        (the candidate of the last confirmed improvement) on the *same* ``check_samples`` draws of
        noise (common random numbers), so the noise of log w largely cancels in the difference. An
        improvement counts when the paired mean difference exceeds ``min_improvement`` plus
        ``PAIRED_Z`` standard errors; the anchor then moves to the candidate. Slow progress
        accumulates against a fixed anchor until it is detected. The result is the last window's
        average: by then the step size has been halved ``patience`` times, and on linear-Gaussian
        models it is closer to the optimum than the anchor (mean shortfall 0.0008 against 0.005 nats).
Cremer, Li & Duvenaud (2018) use Adam with lr 1e-3 from the prior, 50 samples, the window test every
100 steps, no decay, and stop after more than 10 consecutive bad checks: ``patience=11, lr_decay=1``.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import torch

from gapbench.estimators import log_weights
from gapbench.posteriors import DatapointStreams, LocalFamily, RandomStream, fork_seed

GRADIENTS = ("stl", "reparam")
CONVERGENCE_TESTS = ("window", "paired")
PAIRED_Z = 2.0  # one-sided z threshold of the paired test: 2.3% false improvements at convergence


class ActiveSet(NamedTuple):
    """State of the datapoints still being optimised, compacted to the A active rows."""

    positions: torch.Tensor  # (A,) positions in the original batch
    params: dict[str, torch.Tensor]  # each (A, ...)
    exp_avg: dict[str, torch.Tensor]  # Adam first moments, like params
    exp_avg_sq: dict[str, torch.Tensor]  # Adam second moments, like params
    learning_rate: torch.Tensor  # (A,)
    window_sum: torch.Tensor  # (A,) float64, sum of per-step ELBO estimates since the last check
    best: torch.Tensor  # (A,) float64, best window mean so far (window test)
    num_bad_checks: torch.Tensor  # (A,) consecutive checks without improvement
    anchor: dict[str, torch.Tensor]  # parameters at the last confirmed improvement (paired test)
    param_sum: dict[str, torch.Tensor]  # sum of the iterates since the last check (paired test)
    candidate: dict[str, torch.Tensor]  # the last window's average iterate (paired test)
    last_finite: dict[str, torch.Tensor]  # the parameters of the last step's ELBO estimate, which was finite


class RefineResult(NamedTuple):
    """Outcome of refinement for B datapoints.

    params : the optimised parameters, each (B, ...)
    num_steps : (B,) Adam steps each datapoint took
    is_converged : (B,) True where the convergence test stopped it, False where max_steps did
    final_learning_rate : (B,)
    history : (num_checks, B) float64 window-mean ELBO at each check; NaN after a datapoint stopped
    is_diverged : (B,) True where the ELBO estimate or the parameters stopped being finite; such a
        datapoint stops at once and keeps its last parameters with a finite ELBO estimate
    """

    params: dict[str, torch.Tensor]
    num_steps: torch.Tensor
    is_converged: torch.Tensor
    final_learning_rate: torch.Tensor
    history: torch.Tensor
    is_diverged: torch.Tensor


def _objective(model, family: LocalFamily, params: Mapping[str, torch.Tensor], x: torch.Tensor, *,
               num_samples: int, gradient: str, generator: RandomStream | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable surrogate (A,) whose gradient is the ELBO gradient, and the ELBO estimate (A,).

    With ``gradient="stl"`` log q is evaluated at the sampled z with the parameters held fixed, so only
    the path through z carries gradient (Roeder et al., 2017). A posterior that needs more than z for
    that (the auxiliary flow needs v too) provides ``rsample_and_log_prob_stl(num_samples, frozen=...)``
    returning z, log q and the surrogate log q.
    """
    posterior = family.posterior(params)
    if gradient == "stl":
        frozen = family.posterior({k: v.detach() for k, v in params.items()})
        if hasattr(posterior, "rsample_and_log_prob_stl"):
            z, log_q, log_q_path = posterior.rsample_and_log_prob_stl(num_samples, frozen=frozen, generator=generator)
        else:
            z, log_q = posterior.rsample_and_log_prob(num_samples, generator=generator)  # (S, A, Z), (S, A)
            log_q_path = frozen.log_prob(z)  # (S, A): only the path through z carries gradient
    else:
        z, log_q = posterior.rsample_and_log_prob(num_samples, generator=generator)  # (S, A, Z), (S, A)
        log_q_path = log_q
    log_joint = model.log_prior(z) + model.log_likelihood(x, z)  # (S, A)
    estimate = (log_joint - log_q).mean(0).detach()  # (A,)
    return (log_joint - log_q_path).mean(0), estimate


def refine_step(model, family: LocalFamily, x: torch.Tensor, state: ActiveSet, *, step: int,
                num_samples: int, gradient: str, betas: tuple[float, float] = (0.9, 0.999),
                eps: float = 1e-8, generator: RandomStream | None) -> tuple[ActiveSet, torch.Tensor]:
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
    scales = family.step_scale(state.params)
    new_params, new_m, new_v = {}, {}, {}
    for (name, value), grad in zip(params.items(), grads):
        # Adam on the ascent gradient (the moments are the descent moments negated, bit for bit), the
        # moments and the window's sum of iterates updated in place: a local flow holds ~10^5
        # parameters per datapoint, so a batched step is bound by passes over memory, and every
        # pass and every fresh buffer counts. No one else holds these tensors (_select copies rows).
        m = state.exp_avg[name].mul_(beta1).add_(grad, alpha=1 - beta1)
        v = state.exp_avg_sq[name].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        # update = lr * m_hat / (sqrt(v_hat) + eps), m_hat = m / (1 - beta1^t), v_hat = v / (1 - beta2^t)
        lr = state.learning_rate.view(-1, *([1] * (value.ndim - 1))) / (1 - beta1**step)  # (A, 1, ...)
        update = v.sqrt().div_((1 - beta2**step) ** 0.5).add_(eps).reciprocal_().mul_(m).mul_(lr)
        if name in scales:
            update.mul_(scales[name])
        new_params[name] = update.add_(value.detach())  # value + update (ascent)
        new_m[name], new_v[name] = m, v
    param_sum = {k: state.param_sum[k].add_(new_params[k]) for k in new_params}
    # the parameters the estimate was taken at (the driver stops a datapoint whose estimate is not finite)
    last_finite = {k: v.detach() for k, v in state.params.items()}
    state = state._replace(params=new_params, exp_avg=new_m, exp_avg_sq=new_v, param_sum=param_sum,
                           window_sum=state.window_sum + estimate.to(torch.float64), last_finite=last_finite)
    return state, estimate


def rows_finite(params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(A,) True where every parameter of the row is finite."""
    return torch.stack([torch.isfinite(v.flatten(1)).all(1) for v in params.values()]).all(0)


def _record_check(state: ActiveSet, improved: torch.Tensor, *, lr_decay: float) -> ActiveSet:
    """Reset the bad-check count where ``improved`` (A,), else count it and decay the learning rate."""
    num_bad = torch.where(improved, torch.zeros_like(state.num_bad_checks), state.num_bad_checks + 1)
    lr = torch.where(improved, state.learning_rate, state.learning_rate * lr_decay)
    return state._replace(num_bad_checks=num_bad, learning_rate=lr,
                          window_sum=torch.zeros_like(state.window_sum))


def window_check(state: ActiveSet, *, check_every: int, min_improvement: float,
                 lr_decay: float) -> tuple[ActiveSet, torch.Tensor]:
    """The window test; returns the updated state and the window means (A,)."""
    window_mean = state.window_sum / check_every
    improved = window_mean > state.best + min_improvement  # (A,)
    state = state._replace(best=torch.where(improved, window_mean, state.best))
    return _record_check(state, improved, lr_decay=lr_decay), window_mean


@torch.no_grad()
def paired_check(model, family: LocalFamily, x: torch.Tensor, state: ActiveSet, *, check_every: int,
                 check_samples: int, min_improvement: float, lr_decay: float,
                 generator: RandomStream) -> tuple[ActiveSet, torch.Tensor]:
    """The paired test with common random numbers; returns the updated state and window means (A,).

    diff_s = log w(params, eps_s) - log w(anchor, eps_s), s = 1..check_samples, the same eps for
    both; improved where mean(diff) > min_improvement + PAIRED_Z * std(diff) / sqrt(check_samples).
    """
    window_mean = state.window_sum / check_every
    candidate = {k: v / check_every for k, v in state.param_sum.items()}  # the window's average iterate
    noise_state = generator.get_state()
    log_w_now = log_weights(model, family.posterior(candidate), x, num_samples=check_samples,
                            generator=generator)  # (S, A)
    generator.set_state(noise_state)  # replay the same noise for the anchor
    log_w_anchor = log_weights(model, family.posterior(state.anchor), x, num_samples=check_samples,
                               generator=generator)  # (S, A)
    diff = (log_w_now - log_w_anchor).to(torch.float64)  # (S, A)
    stderr = diff.std(0) / check_samples**0.5 if check_samples > 1 else torch.zeros_like(diff[0])
    improved = diff.mean(0) > min_improvement + PAIRED_Z * stderr  # (A,)
    anchor = {k: torch.where(improved.view(-1, *([1] * (v.ndim - 1))), candidate[k], v)
              for k, v in state.anchor.items()}
    state = state._replace(anchor=anchor, candidate=candidate, best=torch.maximum(state.best, window_mean),
                           param_sum={k: torch.zeros_like(v) for k, v in state.param_sum.items()})
    return _record_check(state, improved, lr_decay=lr_decay), window_mean


def _rows_of(generator: RandomStream, positions: torch.Tensor) -> RandomStream:
    """The random stream of the active datapoints: their own streams when per-datapoint, else the same."""
    return generator.select(positions) if isinstance(generator, DatapointStreams) else generator


def _select(state: ActiveSet, keep: torch.Tensor) -> ActiveSet:
    """Keep the rows where ``keep`` (A,) is True."""
    def rows(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v[keep] for k, v in d.items()}
    return ActiveSet(state.positions[keep], rows(state.params), rows(state.exp_avg), rows(state.exp_avg_sq),
                     state.learning_rate[keep], state.window_sum[keep], state.best[keep],
                     state.num_bad_checks[keep], rows(state.anchor), rows(state.param_sum),
                     rows(state.candidate), rows(state.last_finite))


def refine(model, x: torch.Tensor, *, family: LocalFamily, init_params: Mapping[str, torch.Tensor],
           num_samples: int, learning_rate: float, max_steps: int, check_every: int, patience: int,
           lr_decay: float = 1.0, min_improvement: float = 0.0, gradient: str = "stl",
           convergence: str = "paired", check_samples: int = 100,
           generator: RandomStream | None,
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
    convergence : "paired" (common-random-number comparison with the anchor) or "window"
    check_samples : draws of noise per paired check
    generator : random stream (keyword-only); with ``DatapointStreams`` every datapoint draws its
        noise from its own stream, so its result does not depend on the rest of the batch
    callback : called as ``callback(step, num_active)`` after each step, e.g. for a progress bar

    Returns
    -------
    RefineResult with per-datapoint parameters, step counts and convergence flags.
    """
    if gradient not in GRADIENTS:
        raise ValueError(f"unknown gradient estimator {gradient!r}; choose one of {GRADIENTS}")
    if gradient == "stl" and not getattr(family, "supports_stl", True):
        raise ValueError(f"the {family.name!r} family cannot evaluate log q at a given z cheaply, which the 'stl' "
                         "gradient needs; use gradient='reparam' (gapbench.measure.effective_procedure does)")
    if convergence not in CONVERGENCE_TESTS:
        raise ValueError(f"unknown convergence test {convergence!r}; choose one of {CONVERGENCE_TESTS}")
    for name, value in {"num_samples": num_samples, "max_steps": max_steps, "check_every": check_every,
                        "patience": patience, "check_samples": check_samples}.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if not learning_rate > 0 or not 0 < lr_decay <= 1:
        raise ValueError(f"need learning_rate > 0 and 0 < lr_decay <= 1, got {learning_rate}, {lr_decay}")
    num_datapoints = x.shape[0]
    device = x.device
    if generator is None:  # the paired test replays noise, so it needs a stream of its own
        generator = torch.Generator(device=device).manual_seed(fork_seed(None))
    out_params = {k: v.detach().clone() for k, v in init_params.items()}
    num_steps = torch.zeros(num_datapoints, dtype=torch.long, device=device)
    is_converged = torch.zeros(num_datapoints, dtype=torch.bool, device=device)
    final_lr = torch.full((num_datapoints,), float(learning_rate), device=device)
    diverged = torch.zeros(num_datapoints, dtype=torch.bool, device=device)
    history: list[torch.Tensor] = []

    zeros64 = torch.zeros(num_datapoints, dtype=torch.float64, device=device)
    state = ActiveSet(
        positions=torch.arange(num_datapoints, device=device),
        params={k: v.clone() for k, v in out_params.items()},
        exp_avg={k: torch.zeros_like(v) for k, v in out_params.items()},
        exp_avg_sq={k: torch.zeros_like(v) for k, v in out_params.items()},
        learning_rate=final_lr.clone(),
        window_sum=zeros64.clone(),
        best=torch.full_like(zeros64, -torch.inf),
        num_bad_checks=torch.zeros(num_datapoints, dtype=torch.long, device=device),
        anchor={k: v.clone() for k, v in out_params.items()},
        param_sum={k: torch.zeros_like(v) for k, v in out_params.items()},
        candidate={k: v.clone() for k, v in out_params.items()},
        last_finite={k: v.clone() for k, v in out_params.items()},
    )
    x_active, active_generator = x, generator
    step = 0
    while state.positions.numel() > 0 and step < max_steps:
        step += 1
        before = state.last_finite
        state, estimate = refine_step(model, family, x_active, state, step=step, num_samples=num_samples,
                                      gradient=gradient, generator=active_generator)
        # Non-finite parameters make the next estimate non-finite (z = mean + std * eps), so the
        # estimate alone detects divergence, one step later at most; checked every step so that no
        # convergence test sees it.
        bad = ~torch.isfinite(estimate)  # (A,)
        if bool(bad.any()):  # stop these datapoints now, at their last finite point
            done = state.positions[bad]
            for name, tensor in before.items():  # the parameters of the last finite estimate
                out_params[name][done] = tensor[bad]
            num_steps[done] = step
            diverged[done] = True
            final_lr[done] = state.learning_rate[bad]
            state = _select(state, ~bad)
            x_active, active_generator = x[state.positions], _rows_of(generator, state.positions)
            if state.positions.numel() == 0:
                if callback is not None:
                    callback(step, 0)
                break
        is_check = step % check_every == 0
        if is_check:
            if convergence == "paired":
                state, window_mean = paired_check(model, family, x_active, state, check_every=check_every,
                                                  check_samples=check_samples, min_improvement=min_improvement,
                                                  lr_decay=lr_decay, generator=active_generator)
            else:
                state, window_mean = window_check(state, check_every=check_every,
                                                  min_improvement=min_improvement, lr_decay=lr_decay)
            row = torch.full((num_datapoints,), torch.nan, dtype=torch.float64, device=device)
            row[state.positions] = window_mean
            history.append(row)
        stop = state.num_bad_checks >= patience if is_check else None
        if step == max_steps:
            stop = torch.ones_like(state.positions, dtype=torch.bool)
        if stop is not None and bool(stop.any()):
            done = state.positions[stop]
            final = {k: v[stop] for k, v in (state.candidate if convergence == "paired" else state.params).items()}
            is_finite = rows_finite(final)  # (S,) False only if the very last step diverged
            for name, tensor in final.items():
                keep = is_finite.view(-1, *([1] * (tensor.ndim - 1)))
                out_params[name][done] = torch.where(keep, tensor, state.last_finite[name][stop])
            num_steps[done] = step
            diverged[done] = ~is_finite
            is_converged[done] = (state.num_bad_checks[stop] >= patience) & is_finite
            final_lr[done] = state.learning_rate[stop]
            state = _select(state, ~stop)
            x_active, active_generator = x[state.positions], _rows_of(generator, state.positions)
        if callback is not None:
            callback(step, int(state.positions.numel()))
    history_tensor = (torch.stack(history) if history
                      else torch.empty(0, num_datapoints, dtype=torch.float64, device=device))
    return RefineResult(out_params, num_steps, is_converged, final_lr, history_tensor, diverged)
