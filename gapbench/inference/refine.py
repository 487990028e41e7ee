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

Here: the step (:func:`refine_step`: the ELBO gradient, then ``gapbench.inference.adam``'s per-row
Adam), the driver (:func:`refine`: step, check, retire stopped rows); the tests' bookkeeping is
``gapbench.inference.convergence``.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import torch

from gapbench.inference.adam import AdamState, adam_init, adam_step
from gapbench.inference.convergence import (CONVERGENCE_TESTS, ConvergenceState, accumulate, convergence_init,
                                            paired_check, window_check)
from gapbench.posteriors import DatapointStreams, LocalFamily, RandomStream, fork_seed

GRADIENTS = ("stl", "reparam")


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


class ActiveSet(NamedTuple):
    """The datapoints still being optimised, compacted to the A active rows."""

    positions: torch.Tensor  # (A,) positions in the original batch
    x: torch.Tensor  # (A, D) their data
    generator: RandomStream  # their random stream
    params: dict[str, torch.Tensor]  # each (A, ...)
    last_finite: dict[str, torch.Tensor]  # the parameters of the last step's ELBO estimate, which was finite
    adam: AdamState
    convergence: ConvergenceState


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


def elbo_gradient(model, family: LocalFamily, params: Mapping[str, torch.Tensor], x: torch.Tensor, *,
                  num_samples: int, gradient: str,
                  generator: RandomStream | None) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """The gradient of each row's ELBO estimate with respect to its parameters (in the order of ``params``,
    each (A, ...)) and the estimate (A,), from ``num_samples`` draws of z per row."""
    params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    surrogate, estimate = _objective(model, family, params, x, num_samples=num_samples,
                                     gradient=gradient, generator=generator)
    return torch.autograd.grad(surrogate.sum(), list(params.values())), estimate


def refine_step(model, family: LocalFamily, x: torch.Tensor, params: Mapping[str, torch.Tensor], adam: AdamState, *,
                step: int, num_samples: int, gradient: str, betas: tuple[float, float] = (0.9, 0.999),
                eps: float = 1e-8,
                generator: RandomStream | None) -> tuple[dict[str, torch.Tensor], AdamState, torch.Tensor]:
    """One Adam ascent step on the ELBO of every row.

    Parameters
    ----------
    x : (A, D), the rows' datapoints
    params : each (A, ...); not changed
    adam : their Adam state, consumed (:func:`gapbench.inference.adam.adam_step`)
    step : 1-based step number (every row has taken the same number of steps)

    Returns
    -------
    the new parameters, the new Adam state and the ELBO estimate at the old parameters, (A,)
    """
    grads, estimate = elbo_gradient(model, family, params, x, num_samples=num_samples, gradient=gradient,
                                    generator=generator)
    new_params, adam = adam_step(params, grads, adam, step=step, scales=family.step_scale(params),
                                 betas=betas, eps=eps)
    return new_params, adam, estimate


def rows_finite(params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(A,) True where every parameter of the row is finite."""
    return torch.stack([torch.isfinite(v.flatten(1)).all(1) for v in params.values()]).all(0)


def _take_rows(tree, keep: torch.Tensor):
    """The rows ``keep`` (A,) of a tensor, of every tensor of a dict, or of every field of a named tuple."""
    if isinstance(tree, torch.Tensor):
        return tree[keep]
    if isinstance(tree, dict):
        return {k: v[keep] for k, v in tree.items()}
    return type(tree)(*(_take_rows(field, keep) for field in tree))


def _select(active: ActiveSet, keep: torch.Tensor) -> ActiveSet:
    """Keep the rows where ``keep`` (A,) is True; with per-datapoint streams, their streams too."""
    generator = active.generator
    if isinstance(generator, DatapointStreams):
        generator = generator.select(keep)
    return ActiveSet(active.positions[keep], active.x[keep], generator, _take_rows(active.params, keep),
                     _take_rows(active.last_finite, keep), _take_rows(active.adam, keep),
                     _take_rows(active.convergence, keep))


def _retire(out: RefineResult, active: ActiveSet, rows: torch.Tensor, *, step: int,
            params: Mapping[str, torch.Tensor], is_diverged: torch.Tensor | bool,
            is_converged: torch.Tensor | bool) -> ActiveSet:
    """Write the outcome of the active rows where ``rows`` (A,) is True into ``out`` and drop them.
    ``params`` are their final parameters, each (R, ...); the flags are (R,) or one for all."""
    done = active.positions[rows]
    for name, tensor in params.items():
        out.params[name][done] = tensor
    out.num_steps[done] = step
    out.is_diverged[done] = is_diverged
    out.is_converged[done] = is_converged
    out.final_learning_rate[done] = active.adam.learning_rate[rows]
    return _select(active, ~rows)


def _advance(out: RefineResult, model, family: LocalFamily, active: ActiveSet, *, step: int, num_samples: int,
             gradient: str) -> ActiveSet:
    """One step of every active row (:func:`refine_step`), added to the convergence window. A row whose
    estimate is not finite stops at once, flagged, with its last parameters with a finite estimate.

    Non-finite parameters make the next estimate non-finite (z = mean + std * eps), so the estimate
    alone detects divergence, one step later at most; checked every step, before any check sees it."""
    previous = active.last_finite
    params, adam, estimate = refine_step(model, family, active.x, active.params, active.adam, step=step,
                                         num_samples=num_samples, gradient=gradient, generator=active.generator)
    active = active._replace(params=params, adam=adam, last_finite=active.params,
                             convergence=accumulate(active.convergence, params, estimate))
    bad = ~torch.isfinite(estimate)  # (A,)
    if bool(bad.any()):
        active = _retire(out, active, bad, step=step, params=_take_rows(previous, bad), is_diverged=True,
                         is_converged=False)
    return active


def _finish(out: RefineResult, active: ActiveSet, stop: torch.Tensor, *, step: int, patience: int,
            convergence: str) -> ActiveSet:
    """Retire the rows ``stop`` (A,) with their result: the last window's average iterate (paired test)
    or the last iterate (window test); a row whose result is not finite (only if the very last step
    diverged) keeps its last parameters with a finite estimate and is flagged."""
    final = _take_rows(active.convergence.candidate if convergence == "paired" else active.params, stop)
    is_finite = rows_finite(final)  # (R,)
    params = {name: torch.where(is_finite.view(-1, *([1] * (tensor.ndim - 1))), tensor, active.last_finite[name][stop])
              for name, tensor in final.items()}
    is_converged = (active.convergence.num_bad_checks[stop] >= patience) & is_finite
    return _retire(out, active, stop, step=step, params=params, is_diverged=~is_finite, is_converged=is_converged)


def _check(model, family: LocalFamily, active: ActiveSet, *, convergence: str, check_every: int,
           check_samples: int, min_improvement: float, lr_decay: float) -> tuple[ActiveSet, torch.Tensor]:
    """The convergence check of every active row; a row without improvement has its learning rate
    multiplied by ``lr_decay``. Returns the new set and the window means (A,)."""
    if convergence == "paired":
        state, info = paired_check(model, family, active.x, active.convergence, check_every=check_every,
                                   check_samples=check_samples, min_improvement=min_improvement,
                                   generator=active.generator)
    else:
        state, info = window_check(active.convergence, check_every=check_every, min_improvement=min_improvement)
    lr = active.adam.learning_rate
    adam = active.adam._replace(learning_rate=torch.where(info.is_improved, lr, lr * lr_decay))
    return active._replace(convergence=state, adam=adam), info.window_mean


def _history_row(window_mean: torch.Tensor, positions: torch.Tensor, num_datapoints: int) -> torch.Tensor:
    """The window means (A,) of the active rows at their ``positions`` in a (B,) float64 row, NaN elsewhere."""
    row = torch.full((num_datapoints,), torch.nan, dtype=torch.float64, device=window_mean.device)
    row[positions] = window_mean
    return row


def _validate(family: LocalFamily, *, gradient: str, convergence: str, learning_rate: float, lr_decay: float,
              **counts: int) -> None:
    if gradient not in GRADIENTS:
        raise ValueError(f"unknown gradient estimator {gradient!r}; choose one of {GRADIENTS}")
    if gradient == "stl" and not getattr(family, "supports_stl", True):
        raise ValueError(f"the {family.name!r} family cannot evaluate log q at a given z cheaply, which the 'stl' "
                         "gradient needs; use gradient='reparam' (gapbench.measure.effective_procedure does)")
    if convergence not in CONVERGENCE_TESTS:
        raise ValueError(f"unknown convergence test {convergence!r}; choose one of {CONVERGENCE_TESTS}")
    for name, value in counts.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if not learning_rate > 0 or not 0 < lr_decay <= 1:
        raise ValueError(f"need learning_rate > 0 and 0 < lr_decay <= 1, got {learning_rate}, {lr_decay}")


def _start(x: torch.Tensor, init_params: Mapping[str, torch.Tensor], learning_rate: float,
           generator: RandomStream) -> tuple[RefineResult, ActiveSet]:
    """The result to fill (every datapoint at its start, none stopped) and every datapoint active."""
    num_datapoints, device = x.shape[0], x.device
    start = {k: v.detach().clone() for k, v in init_params.items()}
    out = RefineResult(params=start, num_steps=torch.zeros(num_datapoints, dtype=torch.long, device=device),
                       is_converged=torch.zeros(num_datapoints, dtype=torch.bool, device=device),
                       final_learning_rate=torch.full((num_datapoints,), float(learning_rate), device=device),
                       history=torch.empty(0, num_datapoints, dtype=torch.float64, device=device),
                       is_diverged=torch.zeros(num_datapoints, dtype=torch.bool, device=device))
    active = ActiveSet(positions=torch.arange(num_datapoints, device=device), x=x, generator=generator,
                       params={k: v.clone() for k, v in start.items()},
                       last_finite={k: v.clone() for k, v in start.items()},
                       adam=adam_init(start, out.final_learning_rate.clone()), convergence=convergence_init(start))
    return out, active


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
    _validate(family, gradient=gradient, convergence=convergence, learning_rate=learning_rate, lr_decay=lr_decay,
              num_samples=num_samples, max_steps=max_steps, check_every=check_every, patience=patience,
              check_samples=check_samples)
    if generator is None:  # the paired test replays noise, so it needs a stream of its own
        generator = torch.Generator(device=x.device).manual_seed(fork_seed(None))
    out, active = _start(x, init_params, learning_rate, generator)
    history: list[torch.Tensor] = []
    step = 0
    while active.positions.numel() > 0 and step < max_steps:
        step += 1
        active = _advance(out, model, family, active, step=step, num_samples=num_samples, gradient=gradient)
        stop = None
        if step % check_every == 0 and active.positions.numel() > 0:
            active, window_mean = _check(model, family, active, convergence=convergence, check_every=check_every,
                                         check_samples=check_samples, min_improvement=min_improvement,
                                         lr_decay=lr_decay)
            history.append(_history_row(window_mean, active.positions, x.shape[0]))
            stop = active.convergence.num_bad_checks >= patience
        if step == max_steps:
            stop = torch.ones_like(active.positions, dtype=torch.bool)
        if stop is not None and bool(stop.any()):
            active = _finish(out, active, stop, step=step, patience=patience, convergence=convergence)
        if callback is not None:
            callback(step, int(active.positions.numel()))
    return out._replace(history=torch.stack(history)) if history else out
