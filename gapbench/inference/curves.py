"""Refinement curves: the ELBO after k SVI steps from the encoder's output, and the fraction of the
amortization gap that k steps close.

From lambda_0 = the encoder's (mu, log sigma^2) for each datapoint, a fixed procedure (Adam with a
constant step size, ``num_samples`` z per step, no convergence test, no early stopping; the step of
``gapbench.inference.refine`` with its per-row Adam, so datapoints stay independent) runs to the
largest requested step count; at each requested count k the ELBO L_k of every datapoint is estimated with
``eval_samples`` samples drawn from the *same* noise at every k (common random numbers: the noise
eps is fixed, z = mu_k + sigma_k eps). So L_0 is exactly the amortized ELBO L[q] estimated with that
noise, and the differences L_k - L_0 carry only the noise of the change, not of each estimate; their
standard errors come from the paired per-sample differences.

The fraction of the amortization gap that k steps close (Kim et al., 2018, and Cremer et al., 2018,
motivate the question; the definition is ours):

    per datapoint   f_k = (L_k - L_0) / (L[q*] - L_0)
    on average      F_k = mean_i(L_k - L_0) / mean_i(L[q*] - L_0)    (a ratio of means)

with L[q*] from local refinement to convergence (``gapbench.measure.local_posterior``). The standard
error of F_k over datapoints is the delta method's: with a_i = L_k - L_0 and b_i = L[q*] - L_0,
se(F) = sd_i(a_i - F b_i) / (sqrt(n) |mean(b)|) (e.g. Cochran, 1977, "Sampling Techniques", 6.3).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from gapbench.estimators import elbo_from_stats
from gapbench.estimators.log_weights import empty_stats, log_weights, resolve_chunk_size
from gapbench.inference.adam import AdamState, adam_init
from gapbench.inference.frozen import amortized_posterior, frozen
from gapbench.inference.refine import GRADIENTS, refine_step
from gapbench.posteriors import DatapointStreams, DiagonalGaussian, DiagonalGaussianFamily, RandomStream, fork_seed

DEFAULT_STEPS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500)


class CurveProcedure(NamedTuple):
    """Settings of a refinement curve; the keyword arguments of :func:`refinement_curve`."""

    steps: tuple[int, ...] = DEFAULT_STEPS  # step counts k at which the ELBO is estimated
    num_samples: int = 10  # z samples per SVI step
    learning_rate: float = 0.05  # Adam step size, constant (mean steps in units of sigma, as in refine)
    gradient: str = "stl"  # "stl" (sticking the landing) or "reparam"
    eval_samples: int = 1000  # samples per ELBO estimate, the same noise at every k


class RefinementCurve(NamedTuple):
    """ELBO along the SVI trajectories of B datapoints, at S step counts.

    steps : (S,) the step counts k, increasing
    elbo : (S, B) float64, L_k
    stderr : (S, B) float64, Monte Carlo standard error of L_k
    gain_stderr : (S, B) float64, Monte Carlo standard error of L_k - L_0 (paired samples; 0 at k = 0)
    is_diverged : (B,) True where an SVI step's estimate stopped being finite; that datapoint stays at
        the parameters that estimate was taken at from then on
    """

    steps: torch.Tensor
    elbo: torch.Tensor
    stderr: torch.Tensor
    gain_stderr: torch.Tensor
    is_diverged: torch.Tensor


def _check(steps: Sequence[int], num_samples: int, learning_rate: float, gradient: str, eval_samples: int) -> list[int]:
    if gradient not in GRADIENTS:
        raise ValueError(f"unknown gradient estimator {gradient!r}; choose one of {GRADIENTS}")
    if not steps or any(k < 0 for k in steps) or len(set(steps)) != len(steps):
        raise ValueError(f"steps must be distinct step counts >= 0, at least one, got {list(steps)}")
    if num_samples < 1 or eval_samples < 1 or not learning_rate > 0:
        raise ValueError(f"need num_samples >= 1, eval_samples >= 1 and learning_rate > 0, got {num_samples}, "
                         f"{eval_samples}, {learning_rate}")
    return sorted(steps)


class _EvaluationNoise:
    """The evaluation noise of a curve, replayed at every k: a seed for a fresh torch.Generator, or per-datapoint
    streams (:class:`DatapointStreams`, forked from the curve's) set back to their starting state."""

    def __init__(self, generator: RandomStream | None):
        if isinstance(generator, DatapointStreams):
            self.seed, self.streams = None, generator.fork()
            self.state = self.streams.get_state()
        else:
            self.seed, self.streams = fork_seed(generator), None

    def replay(self, device: torch.device) -> RandomStream:
        if self.streams is None:
            return torch.Generator(device=device).manual_seed(self.seed)
        self.streams.set_state(self.state)
        return self.streams


@torch.no_grad()
def _evaluate(model, q: DiagonalGaussian, x: torch.Tensor, *, num_samples: int, chunk_size: int | None,
              noise: _EvaluationNoise, reference: list[torch.Tensor] | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """ELBO (B,), its stderr (B,), the stderr of its difference from ``reference`` (B,) and the
    log-weight chunks, from the replayed ``noise``, in the chunks ``gapbench.elbo`` uses (so with a seed the
    estimate equals ``elbo(model, q, x, generator=Generator().manual_seed(seed))`` exactly)."""
    generator = noise.replay(x.device)
    step = resolve_chunk_size(chunk_size, num_samples, x.shape[0])
    stats, diff_stats, chunks = empty_stats(), empty_stats(), []
    for start in range(0, num_samples, step):
        log_w = log_weights(model, q, x, num_samples=min(step, num_samples - start), generator=generator)  # (k, B)
        stats = stats.merge(log_w)
        chunks.append(log_w.to(torch.float64))
        if reference is not None:
            diff_stats = diff_stats.merge(chunks[-1] - reference[len(chunks) - 1])
    estimate = elbo_from_stats(stats)
    gain_stderr = elbo_from_stats(diff_stats).stderr if reference is not None else torch.zeros_like(estimate.value)
    return estimate.value, estimate.stderr, gain_stderr, chunks


def refinement_curve(model, encoder: Callable, x: torch.Tensor, *, steps: Sequence[int] = DEFAULT_STEPS,
                     num_samples: int = 10, learning_rate: float = 0.05, gradient: str = "stl",
                     eval_samples: int = 1000, chunk_size: int | None = None, generator: RandomStream | None,
                     callback: Callable[[int], None] | None = None) -> RefinementCurve:
    """The ELBO of every datapoint of x (B, D) after k SVI steps from the encoder's output, for k in ``steps``.

    Parameters
    ----------
    model : ``log_prior(z) -> (K, B)``, ``log_likelihood(x, z) -> (K, B)``; its parameters are not changed
    encoder : x (B, D) -> a diagonal Gaussian (``Independent(Normal(mu, sigma), 1)`` or DiagonalGaussian)
    steps : step counts k (distinct, >= 0); the SVI runs to the largest
    num_samples, learning_rate, gradient : the SVI steps (see :class:`CurveProcedure`)
    eval_samples : samples per ELBO estimate; the noise is drawn once (a seed from ``generator``, or with
        per-datapoint streams, :class:`DatapointStreams`, streams forked from each datapoint's) and
        replayed at every k
    chunk_size : samples per chunk of the estimates (None: automatic)
    generator : random stream: the evaluation seed first, then the SVI steps' noise
    callback : called with the step number after each SVI step (e.g. a progress bar)
    """
    steps = _check(steps, num_samples, learning_rate, gradient, eval_samples)
    q = amortized_posterior(encoder, x)
    if not isinstance(q, DiagonalGaussian):
        raise TypeError("a refinement curve starts from the encoder's diagonal Gaussian; this encoder returned "
                         f"{type(q).__name__}")
    family = DiagonalGaussianFamily()
    params = family.init_params(x.shape[0], q.mean.shape[-1], like=q.mean, init_from=q)  # (B, Z) each
    eval_noise = _EvaluationNoise(generator)
    adam = adam_init(params, torch.full((x.shape[0],), float(learning_rate), dtype=q.mean.dtype, device=x.device))
    is_diverged = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    rows, reference = [], None
    with frozen(model):
        for step in range(steps[-1] + 1):
            if step > 0:
                evaluated = params
                params, adam, estimate = refine_step(model, family, x, params, adam, step=step,
                                                     num_samples=num_samples, gradient=gradient, generator=generator)
                bad = ~torch.isfinite(estimate)  # (B,): back to the parameters of the estimate, and stay there
                if bool(bad.any()):
                    params, adam = _freeze(params, adam, evaluated, bad)
                    is_diverged |= bad
                if callback is not None:
                    callback(step)
            if step in steps:
                value, stderr, gain_stderr, chunks = _evaluate(
                    model, family.posterior(params), x, num_samples=eval_samples, chunk_size=chunk_size,
                    noise=eval_noise, reference=reference)
                reference = chunks if reference is None else reference
                rows.append((value, stderr, gain_stderr))
    value, stderr, gain_stderr = (torch.stack(column) for column in zip(*rows))  # (S, B) each
    return RefinementCurve(torch.tensor(steps), value, stderr, gain_stderr, is_diverged)


def _freeze(params: dict[str, torch.Tensor], adam: AdamState, evaluated: dict[str, torch.Tensor],
            bad: torch.Tensor) -> tuple[dict[str, torch.Tensor], AdamState]:
    """Rows ``bad`` (B,) back to ``evaluated`` with zero Adam moments and step size, so no later step
    moves them."""
    def where(new: dict, old: dict) -> dict:
        return {k: torch.where(bad.view(-1, *([1] * (v.ndim - 1))), old[k], v) for k, v in new.items()}
    zeros = {k: torch.zeros_like(v) for k, v in params.items()}
    lr = adam.learning_rate
    return where(params, evaluated), AdamState(where(adam.exp_avg, zeros), where(adam.exp_avg_sq, zeros),
                                               torch.where(bad, torch.zeros_like(lr), lr))


def curve_frame(curve: RefinementCurve, elbo_q_star: torch.Tensor | np.ndarray | None = None,
                *, offset: int = 0) -> pd.DataFrame:
    """The curve in long form: one row per (datapoint, step) with ``elbo``, ``stderr``, ``gain``
    (L_k - L_0), ``gain_stderr``, ``diverged`` and, given L[q*] (B,), ``gap_closed`` (f_k).
    ``offset`` is added to the datapoint numbers (for batches of a larger set)."""
    num_steps, num_datapoints = curve.elbo.shape
    elbo = curve.elbo.cpu().numpy()  # (S, B)
    gain = elbo - elbo[:1]  # (S, B)
    frame = pd.DataFrame({
        "datapoint": np.tile(np.arange(num_datapoints) + offset, num_steps),
        "step": np.repeat(curve.steps.cpu().numpy(), num_datapoints),
        "elbo": elbo.ravel(), "stderr": curve.stderr.cpu().numpy().ravel(),
        "gain": gain.ravel(), "gain_stderr": curve.gain_stderr.cpu().numpy().ravel(),
        "diverged": np.tile(curve.is_diverged.cpu().numpy(), num_steps),
    })
    if elbo_q_star is not None:
        best = np.asarray(elbo_q_star.cpu() if isinstance(elbo_q_star, torch.Tensor) else elbo_q_star, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            frame["gap_closed"] = (gain / (best - elbo[0])).ravel()  # (S, B) -> (S * B,)
    return frame.sort_values(["datapoint", "step"], kind="stable", ignore_index=True)


def ratio_of_means(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """mean(a) / mean(b) over paired values, and its delta-method standard error over the pairs."""
    n = len(a)
    if n == 0 or b.mean() == 0:
        return math.nan, math.nan
    ratio = a.mean() / b.mean()
    stderr = (a - ratio * b).std(ddof=1) / (math.sqrt(n) * abs(b.mean())) if n > 1 else math.nan
    return float(ratio), float(stderr)


def summarize_curve(frame: pd.DataFrame, elbo_q_star: np.ndarray | None = None) -> dict:
    """Per step, over the datapoints that did not diverge (and whose L[q*] is finite):
    ``{"steps": [...], "mean_elbo", "mean_elbo_stderr", "mean_elbo_mc_stderr", "mean_gain",
    "mean_gain_stderr", "mean_gain_mc_stderr", "num_datapoints"}`` and, given L[q*] (one per datapoint,
    in datapoint order), ``"mean_elbo_q_star"``, ``"fraction_closed"`` (F_k) and ``"fraction_closed_stderr"``;
    lists run along the steps. Standard errors: ``_stderr`` over datapoints, ``_mc_stderr`` Monte Carlo."""
    elbo = frame.pivot(index="datapoint", columns="step", values="elbo")  # (N, S)
    gain = frame.pivot(index="datapoint", columns="step", values="gain")
    gain_se = frame.pivot(index="datapoint", columns="step", values="gain_stderr")
    se = frame.pivot(index="datapoint", columns="step", values="stderr")
    usable = ~frame.groupby("datapoint")["diverged"].any().reindex(elbo.index).to_numpy()
    usable &= np.isfinite(elbo.to_numpy()).all(1)
    best = None
    if elbo_q_star is not None:
        best = np.asarray(elbo_q_star, dtype=np.float64)[elbo.index.to_numpy()]
        usable &= np.isfinite(best)
    n = int(usable.sum())
    root_n = math.sqrt(n) if n else math.nan

    def mean(table):
        return [float(v) for v in table.to_numpy()[usable].mean(0)]

    def stderr(table):
        if n < 2:
            return [math.nan] * table.shape[1]
        return [float(v) for v in table.to_numpy()[usable].std(0, ddof=1) / root_n]

    def mc_stderr(table):
        if n == 0:
            return [math.nan] * table.shape[1]
        return [float(v) for v in np.sqrt(np.square(table.to_numpy()[usable]).sum(0)) / n]

    summary = {"steps": [int(k) for k in elbo.columns], "num_datapoints": n,
               "num_diverged": int(frame.groupby("datapoint")["diverged"].any().sum()),
               "mean_elbo": mean(elbo), "mean_elbo_stderr": stderr(elbo), "mean_elbo_mc_stderr": mc_stderr(se),
               "mean_gain": mean(gain), "mean_gain_stderr": stderr(gain), "mean_gain_mc_stderr": mc_stderr(gain_se)}
    if best is not None:
        start = elbo.to_numpy()[usable][:, 0]  # L_0 (N,)
        pairs = [ratio_of_means(gain.to_numpy()[usable][:, s], best[usable] - start) for s in range(elbo.shape[1])]
        summary["mean_elbo_q_star"] = float(best[usable].mean()) if n else math.nan
        summary["fraction_closed"] = [p[0] for p in pairs]
        summary["fraction_closed_stderr"] = [p[1] for p in pairs]
    return summary
