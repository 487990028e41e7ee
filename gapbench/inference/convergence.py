"""The convergence tests of refinement, per row: did the last window of steps improve the ELBO?

``gapbench.inference.refine``'s docstring gives the rule. The state collects a window of steps
(:func:`accumulate`); every ``check_every`` steps a check decides, per row, whether the window
improved, and resets the window:

- :func:`window_check`: the window's mean ELBO estimate beats the best window mean so far by
  ``min_improvement``;
- :func:`paired_check`: the window's average iterate (the candidate) beats the anchor (the candidate
  of the last confirmed improvement) on the same ``check_samples`` draws of noise by
  ``min_improvement`` plus ``PAIRED_Z`` standard errors of the paired differences; the anchor then
  moves to the candidate.

A check counts the consecutive checks without improvement (``num_bad_checks``); what follows from a
bad check (a smaller step size, stopping the row) is the driver's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch

from gapbench.estimators import log_weights
from gapbench.posteriors import LocalFamily, RandomStream

CONVERGENCE_TESTS = ("window", "paired")
PAIRED_Z = 2.0  # one-sided z threshold of the paired test: 2.3% false improvements at convergence


class ConvergenceState(NamedTuple):
    """The convergence bookkeeping of A rows."""

    window_sum: torch.Tensor  # (A,) float64, sum of per-step ELBO estimates since the last check
    best: torch.Tensor  # (A,) float64, best window mean so far
    num_bad_checks: torch.Tensor  # (A,) consecutive checks without improvement
    anchor: dict[str, torch.Tensor]  # parameters at the last confirmed improvement (paired test), each (A, ...)
    param_sum: dict[str, torch.Tensor]  # sum of the iterates since the last check (paired test)
    candidate: dict[str, torch.Tensor]  # the last window's average iterate (paired test)


class CheckInfo(NamedTuple):
    """What a check found, per row."""

    is_improved: torch.Tensor  # (A,) bool
    window_mean: torch.Tensor  # (A,) float64, the window's mean ELBO estimate


def convergence_init(params: Mapping[str, torch.Tensor]) -> ConvergenceState:
    """An empty window, no best yet, and anchor and candidate at ``params`` (each (A, ...), copied)."""
    first = next(iter(params.values()))
    zeros64 = torch.zeros(first.shape[0], dtype=torch.float64, device=first.device)
    return ConvergenceState(
        window_sum=zeros64.clone(), best=torch.full_like(zeros64, -torch.inf),
        num_bad_checks=torch.zeros(first.shape[0], dtype=torch.long, device=first.device),
        anchor={k: v.clone() for k, v in params.items()},
        param_sum={k: torch.zeros_like(v) for k, v in params.items()},
        candidate={k: v.clone() for k, v in params.items()},
    )


def accumulate(state: ConvergenceState, params: Mapping[str, torch.Tensor],
               estimate: torch.Tensor) -> ConvergenceState:
    """Add a step's new parameters and its ELBO estimate (A,) to the window (``param_sum`` in place)."""
    param_sum = {k: state.param_sum[k].add_(params[k]) for k in params}
    return state._replace(param_sum=param_sum, window_sum=state.window_sum + estimate.to(torch.float64))


def _record_check(state: ConvergenceState, improved: torch.Tensor) -> ConvergenceState:
    """Reset the bad-check count where ``improved`` (A,), else count it; empty the window."""
    num_bad = torch.where(improved, torch.zeros_like(state.num_bad_checks), state.num_bad_checks + 1)
    return state._replace(num_bad_checks=num_bad, window_sum=torch.zeros_like(state.window_sum))


def window_check(state: ConvergenceState, *, check_every: int,
                 min_improvement: float) -> tuple[ConvergenceState, CheckInfo]:
    """The window test: improved where the window mean beats the best so far by ``min_improvement``."""
    window_mean = state.window_sum / check_every
    improved = window_mean > state.best + min_improvement  # (A,)
    state = state._replace(best=torch.where(improved, window_mean, state.best))
    return _record_check(state, improved), CheckInfo(improved, window_mean)


@torch.no_grad()
def paired_check(model, family: LocalFamily, x: torch.Tensor, state: ConvergenceState, *, check_every: int,
                 check_samples: int, min_improvement: float,
                 generator: RandomStream) -> tuple[ConvergenceState, CheckInfo]:
    """The paired test with common random numbers, for the rows x (A, D).

    diff_s = log w(candidate, eps_s) - log w(anchor, eps_s), s = 1..check_samples, the same eps for
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
    return _record_check(state, improved), CheckInfo(improved, window_mean)
