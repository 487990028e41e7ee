"""The stages of a run, one small function each, and the two helpers that own their common skeleton.

:func:`evaluation_stage` runs a stage whose work is cut into units of datapoints, on every rank:
skip it when finished (rank 0 reads its output back) -> record its start -> choose the torch threads
-> run every part's units (resuming from and saving to partial/, ``gapbench.runner.partial``) ->
on rank 0: write the outputs from the gathered results, record the stage, clear partial/.
:func:`rank0_stage` runs a stage that rank 0 does alone (calibration, report): skip when finished,
record the start, compute and write, record the end.

Every ``ranks.is_main`` branch of the stages lives in these helpers and in ``Run.on_main`` (rank 0
only) and ``Run.from_main`` (rank 0's value on every rank); a stage function says only what it
computes for a unit and what it writes. The train stage (``gapbench.runner.training``) resumes from
train_state.pt instead of units, and with ``train.data_parallel`` every rank trains.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from typing import TYPE_CHECKING, Callable, Iterable, NamedTuple, TypeVar

import pandas as pd
import torch
from tqdm.auto import tqdm

from gapbench import io
from gapbench.calibration import calibrate_ais, calibration_lines
from gapbench.estimators.health import UNHEALTHY, ais_flags
from gapbench.estimators.log_px import selected_log_px
from gapbench.gaps import decompose, estimate_columns, find_faults
from gapbench.inference.curves import curve_frame, refinement_curve, summarize_curve
from gapbench.measure import ais_diagnostics, ais_of, bounds_of, fresh_estimators, local_posterior
from gapbench.outputs import join_on_index, sha256_file, with_index
from gapbench.posteriors import DatapointStreams, DiagonalGaussian, FlowFamily
from gapbench.report import gap_table_markdown
from gapbench.runner import migrate
from gapbench.runner.build import datapoint_streams, local_family, log_px_candidates, stage_generator
from gapbench.runner.partial import PartialStore, Unit, UnitResult, concat, run_units
from gapbench.runner.stage_files import read_finished, read_q_star, read_summary_of
from gapbench.runner.stage_table import STAGE_OF
from gapbench.runner.summary import run_summary

if TYPE_CHECKING:
    from gapbench.runner.run import Run

Result = TypeVar("Result")
# The amortized stage evaluates units of this many (datapoint, sample) pairs (k = 5000: 26 datapoints, a
# few seconds on one CPU thread), each saved under partial/, so a stop loses at most one unit.
AMORTIZED_UNIT_ROWS = 2**17
Q_STAR_FFG = "elbo_q_star_ffg"  # L[q*] of the diagonal Gaussian, the family a curve refines


class Part(NamedTuple):
    """A piece of an evaluation stage run over every datapoint: its units' computation."""

    compute: Callable[[Unit], UnitResult]
    desc: str  # the progress bar's label
    name: str | None = None  # a piece whose numbers and partial files are its own (a local family)
    unit_size: int | None = None  # datapoints per unit (default: one unit per batch of eval.batch_size)


# --- the helpers that own the skeleton ------------------------------------------------------------------

def evaluation_stage(run: Run, stage: str, parts: Callable[[], Iterable[Part]],
                     write: Callable[[dict[str | None, list[UnitResult]]], Result],
                     read_back: Callable[[], Result]) -> Result | None:
    """Run ``stage`` over the evaluation datapoints (see the module docstring); None when it is not enabled
    and on ranks other than 0. ``parts`` is called (on every rank) once the stage is not skipped;
    ``write`` gets every part's results on rank 0 and writes the stage's outputs."""
    if not STAGE_OF[stage].is_enabled(run.config):
        return None
    if run.is_finished(stage):
        run.log(f"[{stage}] skipped: finished ({run.dir / shown_output(stage)})")
        return read_back() if run.ranks.is_main else None
    if run.ranks.is_main:
        run.folder.start(stage)
    run.use_threads(stage)
    start = time.perf_counter()
    results = {part.name: run_part(run, stage, part) for part in parts()}
    if not run.ranks.is_main:
        return None
    value = write(results)
    run.folder.finish(stage, time.perf_counter() - start)
    for name in results:
        PartialStore(run.dir, stage if name is None else f"{stage}_{name}", "").clear()
    return value


def run_part(run: Run, stage: str, part: Part) -> list[UnitResult] | None:
    """Every unit of ``part`` through its computation, resuming from and saving to partial/; the results in
    datapoint order on rank 0, None on the others."""
    name = stage if part.name is None else f"{stage}_{part.name}"
    store = PartialStore(run.dir, name, partial_key(run, stage)) if run.ranks.is_main else None
    plan = run.plan(part.unit_size)
    run.deadline.begin()
    with tqdm(total=sum(u.size for units in plan for u in units), desc=part.desc, unit="datapoint",
              disable=not run.progress) as bar:
        def on_round(num_datapoints: int) -> None:
            bar.update(num_datapoints)
            run.deadline.progressed()
        return run_units(plan, part.compute, store=store, ranks=run.ranks, should_stop=run.deadline.should_stop,
                         what=name, on_round=on_round, on_saved=bar.update)


def partial_key(run: Run, stage: str) -> str:
    """The key of a stage's partial files: its config hash and the sha256 of the files it reads."""
    digest = hashlib.sha256(run.folder.stage_hash(stage).encode())
    for name in STAGE_OF[stage].read_files(run.config):
        digest.update(sha256_file(run.dir / name).encode())
    return digest.hexdigest()


def rank0_stage(run: Run, stage: str, compute: Callable[[], Result], read_back: Callable[[], Result]) -> Result | None:
    """A stage rank 0 does alone: skipped when finished (``read_back``), else ``compute`` writes its outputs
    and the stage is recorded; None when it is not enabled and on the other ranks."""
    if not (run.ranks.is_main and STAGE_OF[stage].is_enabled(run.config)):
        return None
    if run.folder.is_finished(stage):
        run.log(f"[{stage}] skipped: finished ({run.dir / shown_output(stage)})")
        return read_back()
    run.folder.start(stage)
    start = time.perf_counter()
    value = compute()
    run.folder.finish(stage, time.perf_counter() - start)
    return value


def shown_output(stage: str) -> str:
    """The output a log line names for ``stage``."""
    return "summary.json" if stage == "report" else STAGE_OF[stage].outputs[-1]


def one_frame(run: Run, stage: str) -> Callable[[dict[str | None, list[UnitResult]]], pd.DataFrame]:
    """``write`` of a stage with one part and one file: the units' rows joined and written."""
    def write(results: dict[str | None, list[UnitResult]]) -> pd.DataFrame:
        frame, _ = concat(results[None])
        io.write_csv(run.dir / STAGE_OF[stage].outputs[0], frame)
        return frame
    return write


def read_frame(run: Run, stage: str) -> Callable[[], pd.DataFrame]:
    """``read_back`` of a stage with one per-datapoint file: the file, checked and ordered by index."""
    return lambda: read_finished(run.dir / STAGE_OF[stage].outputs[0], run.config)


def unit_bar(run: Run, unit: Unit, total: int, what: str, unit_name: str = "step") -> tqdm:
    """The progress bar inside a unit (left behind when it closes)."""
    return tqdm(total=total, desc=f"  [{unit.start}:{unit.stop}] {what}", unit=unit_name, leave=False,
                disable=not run.progress)


def step_callback(run: Run, bar: tqdm) -> Callable[[int], None]:
    """An annealing or SVI loop's callback: one step on ``bar``, then the deadline read inside the unit."""
    def callback(step: int) -> None:
        bar.update(1)
        run.stop_inside()
    return callback


# --- the evaluation stages ------------------------------------------------------------------------------

def amortized(run: Run, decoder, encoder, x: torch.Tensor) -> pd.DataFrame | None:
    """L[q] and IWAE under the encoder's q for every datapoint (amortized.csv)."""
    num_samples = run.config.eval.num_samples

    def compute(unit: Unit) -> UnitResult:
        batch = x[unit.start:unit.stop].to(run.device)
        with torch.no_grad():
            q = encoder(batch)
        pair = bounds_of(decoder, q, batch, num_samples=num_samples,
                         chunk_size=run.chunk_size(batch.shape[0], with_gradient=False),
                         generator=run.streams("amortized", unit.start, batch))
        return UnitResult(with_index(pd.DataFrame({**estimate_columns("elbo_q", pair.elbo),
                                                   **estimate_columns("iwae_q", pair.iwae)}), unit.start), {})

    def parts() -> list[Part]:
        return [Part(compute, "L[q], IWAE", unit_size=max(1, AMORTIZED_UNIT_ROWS // num_samples))]
    return evaluation_stage(run, "amortized", parts, one_frame(run, "amortized"), read_frame(run, "amortized"))


def local(run: Run, decoder, encoder, x: torch.Tensor) -> pd.DataFrame | None:
    """Refine every family of ``refine.families`` for every datapoint: local.csv (columns per family) and
    local.pt (the q* parameters, {family: {name: (N, ...)}})."""
    families = run.config.refine.families

    def parts() -> Iterable[Part]:
        for name in families:
            yield Part(refine_unit(run, decoder, encoder, x, name), f"refine q*_{name}", name=name)

    def write(results: dict[str | None, list[UnitResult]]) -> pd.DataFrame:
        joined = {name: concat(results[name]) for name in families}
        frame = join_on_index([joined[name][0] for name in families])
        io.save_torch(run.dir / "local.pt", {name: joined[name][1] for name in families})
        io.write_csv(run.dir / "local.csv", frame)
        return frame
    return evaluation_stage(run, "local", parts, write, lambda: read_finished(run.dir / "local.csv", run.config))


def refine_unit(run: Run, decoder, encoder, x: torch.Tensor, name: str) -> Callable[[Unit], UnitResult]:
    """q*_name for a unit of datapoints: the per-datapoint columns and the parameters (on the CPU).
    Each family draws from its own streams (per datapoint, keyed by the family's name too), so adding
    a family changes no other family's numbers."""
    refine, family = run.config.refine, local_family(run.config, name)
    procedure = refine.resolved(name)
    is_flow = isinstance(family, FlowFamily)
    on_ffg = refine.flow_init == "q_star_ffg" and is_flow
    init = "encoder" if refine.flow_init == "encoder" and is_flow else refine.init

    def compute(unit: Unit) -> UnitResult:
        batch = x[unit.start:unit.stop].to(run.device)
        generator = run.streams("local", unit.start, batch, part=name)
        # a flow on top of the local FFG: q*_FFG again from the FFG's own streams and procedure, so the
        # flow starts exactly at the q*_FFG this stage reports (the FFG costs a small part of a flow)
        init_from = local_ffg(run, decoder, encoder, batch, unit) if on_ffg else None
        with unit_bar(run, unit, unit.size, "stopped", "datapoint") as bar:
            def callback(step: int, num_active: int) -> None:  # datapoints leave as they converge
                bar.set_postfix(step=step, active=num_active, refresh=False)
                bar.update(unit.size - num_active - bar.n)
                run.stop_inside()
            result = local_posterior(decoder, encoder, batch, family=family, init=init,
                                     procedure=procedure, generator=generator, callback=callback,
                                     init_from=init_from)
        pair = bounds_of(decoder, family.posterior(result.params), batch, num_samples=run.config.eval.num_samples,
                         chunk_size=run.chunk_size(batch.shape[0], with_gradient=False), generator=generator)
        return UnitResult(with_index(pd.DataFrame({
            **estimate_columns(f"elbo_q_star_{name}", pair.elbo),
            **estimate_columns(f"iwae_q_star_{name}", pair.iwae),
            f"refine_steps_{name}": result.num_steps.cpu().numpy(),
            f"refine_converged_{name}": result.is_converged.cpu().numpy(),
            f"refine_diverged_{name}": result.is_diverged.cpu().numpy(),
        }), unit.start), cpu_tensors(result.params))
    return compute


def local_ffg(run: Run, decoder, encoder, batch: torch.Tensor, unit: Unit) -> DiagonalGaussian:
    """q*_FFG of a unit's datapoints as the FFG part refines it (its streams, procedure and start)."""
    ffg = local_family(run.config, "ffg")
    result = local_posterior(decoder, encoder, batch, family=ffg, init=run.config.refine.init,
                             procedure=run.config.refine.resolved("ffg"),
                             generator=run.streams("local", unit.start, batch, part="ffg"),
                             callback=lambda step, num_active: run.stop_inside())
    return DiagonalGaussian(result.params["mean"], result.params["log_var"])


def ais(run: Run, decoder, encoder, x: torch.Tensor) -> pd.DataFrame | None:
    """AIS from the configured start for every datapoint (ais.csv); None when ``ais.enabled`` is false."""
    settings = run.config.ais
    family = local_family(run.config, run.config.model.posterior)  # AIS from q* starts at the encoder family's q*

    def parts() -> list[Part]:
        q_star_params = None
        if settings.init == "q_star":  # rank 0 reads local.pt and sends it: no shared file system needed
            q_star_params = run.from_main(lambda: read_q_star(run.dir / "local.pt", run.config.model.posterior,
                                                              x.shape[0]))

        def compute(unit: Unit) -> UnitResult:
            batch = x[unit.start:unit.stop].to(run.device)
            q_star = None if q_star_params is None else family.posterior(
                {k: v[unit.start:unit.stop].to(run.device) for k, v in q_star_params.items()})
            with unit_bar(run, unit, settings.num_steps, "annealing") as bar:
                estimate = ais_of(decoder, batch, init=settings.init, encoder=encoder, q_star=q_star,
                                  procedure=settings.procedure(),
                                  chunk_size=run.chunk_size(batch.shape[0], with_gradient=True),
                                  generator=run.streams("ais", unit.start, batch), callback=step_callback(run, bar))
            return UnitResult(with_index(pd.DataFrame({
                **estimate_columns("ais", estimate),
                **{k: v.cpu().numpy() for k, v in ais_diagnostics(estimate).items()}}), unit.start), {})
        return [Part(compute, "AIS")]
    return evaluation_stage(run, "ais", parts, one_frame(run, "ais"), read_frame(run, "ais"))


def log_px(run: Run, decoder, encoder, x: torch.Tensor, pilot: pd.DataFrame | None) -> pd.DataFrame | None:
    """log p_hat(x) for every datapoint (log_px.csv): the estimator chosen on the pilot bounds (``pilot``,
    rank 0's frame of amortized.csv, local.csv and ais.csv side by side), drawn again from the
    datapoint's streams of this stage, one part per estimator (``selected_log_px``, as ``measure_gaps``)."""
    config = run.config
    candidates = log_px_candidates(config)

    def parts() -> list[Part]:
        columns = [n for name in candidates for n in (name, f"{name}_stderr", f"{name}_ess")]
        chosen_from = run.from_main(lambda: pilot[columns + ([UNHEALTHY] if UNHEALTHY in pilot else [])])
        q_star_params = run.from_main(lambda: migrate.q_star_by_family(
            torch.load(run.dir / "local.pt", weights_only=True), config.refine.families))
        return [Part(log_px_unit(run, decoder, encoder, x, chosen_from, q_star_params), "log p_hat(x), fresh draws")]
    return evaluation_stage(run, "log_px", parts, one_frame(run, "log_px"), read_frame(run, "log_px"))


def log_px_unit(run: Run, decoder, encoder, x: torch.Tensor, pilot: pd.DataFrame,
                q_star_params: dict) -> Callable[[Unit], UnitResult]:
    """log p_hat(x) for a unit of datapoints: each candidate estimator drawn from its own streams."""
    config, settings = run.config, run.config.ais
    candidates = log_px_candidates(config)

    def compute(unit: Unit) -> UnitResult:
        batch = x[unit.start:unit.stop].to(run.device)
        rows = slice(unit.start, unit.stop)
        q_stars = {f"iwae_q_star_{f}": (local_family(config, f), {k: v[rows].to(run.device)
                                                                  for k, v in q_star_params[f].items()})
                   for f in config.refine.families}
        ais_settings = None if not settings.enabled else {
            "init": settings.init, "encoder": encoder, "procedure": settings.procedure(),
            "q_star": f"iwae_q_star_{config.model.posterior}" if settings.init == "q_star" else None,
            "chunk_size": run.chunk_size(batch.shape[0], with_gradient=True)}

        def streams(name: str, positions: torch.Tensor) -> DatapointStreams:
            return datapoint_streams(config.seed, "log_px", (positions + unit.start).tolist(), run.device, part=name)
        estimators = fresh_estimators(decoder, batch, encoder=encoder, q_stars=q_stars,
                                      num_samples=config.eval.num_samples,
                                      chunk_size=run.chunk_size(batch.shape[0], with_gradient=False),
                                      ais=ais_settings, streams=streams)
        chosen = selected_log_px(pilot.iloc[rows].reset_index(drop=True), candidates, estimators)
        return UnitResult(with_index(chosen, unit.start), {})
    return compute


def curve(run: Run, decoder, encoder, x: torch.Tensor, pilot: pd.DataFrame | None) -> pd.DataFrame | None:
    """The refinement curve of every datapoint (curve.csv, ``gapbench.inference.curves``); None when
    ``curve.enabled`` is false. The fraction of the gap closed uses L[q*] of the local stage (in ``pilot``,
    rank 0's frame of :func:`pilot_frame`)."""
    procedure = run.config.curve.procedure()

    def parts() -> list[Part]:
        # L[q*] of every datapoint: local.csv is rank 0's, so rank 0 sends the column to every rank
        elbo_q_star = run.from_main(lambda: pilot[Q_STAR_FFG].to_numpy())

        def compute(unit: Unit) -> UnitResult:
            batch = x[unit.start:unit.stop].to(run.device)
            with unit_bar(run, unit, procedure.steps[-1], "SVI") as bar:
                result = refinement_curve(decoder, encoder, batch, **procedure._asdict(),
                                          chunk_size=run.config.eval.chunk_size,
                                          generator=run.streams("curve", unit.start, batch),
                                          callback=step_callback(run, bar))
            return UnitResult(curve_frame(result, elbo_q_star[unit.start:unit.stop], offset=unit.start), {})
        return [Part(compute, "curve")]
    return evaluation_stage(run, "curve", parts, one_frame(run, "curve"), lambda: io.read_csv(run.dir / "curve.csv"))


# --- the stages rank 0 does alone -----------------------------------------------------------------------

def calibration(run: Run, decoder, encoder) -> dict | None:
    """BDMC with the run's AIS settings on ``ais.calibration_datapoints`` datapoints simulated from the
    model (ais_calibration.json; on the CPU: a few dozen datapoints, and simulation draws on the CPU;
    ``gapbench.calibration``); None when that is 0 or AIS is off."""
    settings, path = run.config.ais, run.dir / "ais_calibration.json"

    def compute() -> dict:
        with tqdm(total=2 * settings.num_steps, desc="AIS calibration (BDMC)", unit="step",
                  disable=not run.progress) as bar:
            cpu_decoder, cpu_encoder = (copy.deepcopy(network).cpu() for network in (decoder, encoder))
            result = calibrate_ais(cpu_decoder, cpu_encoder, num_datapoints=settings.calibration_datapoints,
                                   procedure=settings.procedure(),
                                   init="prior" if settings.init == "prior" else "encoder",
                                   tolerance=settings.calibration_tolerance,
                                   generator=stage_generator(run.config.seed, "calibration"),
                                   callback=step_callback(run, bar))
        io.write_json(path, result)
        for line in calibration_lines(result):
            run.log(f"[calibration] {line}")
        return result
    return rank0_stage(run, "calibration", compute, lambda: json.loads(path.read_text()))


def pilot_frame(run: Run, amortized_frame: pd.DataFrame, local_frame: pd.DataFrame,
                ais_frame: pd.DataFrame | None) -> pd.DataFrame:
    """amortized.csv, local.csv (in its current form) and ais.csv side by side, on rank 0: the pilot bounds.
    A flagged AIS estimate stays in the frame but not in log p_hat (``gapbench.estimators.health``)."""
    local_frame = migrate.local_in_current_form(local_frame, run.config.model.posterior)
    if ais_frame is not None:
        ais_frame = pd.concat([ais_frame, ais_flags(ais_frame, **run.config.ais.flags())], axis=1)
    return join_on_index([amortized_frame, local_frame] + ([ais_frame] if ais_frame is not None else []))


def report(run: Run, x: torch.Tensor, pilot: pd.DataFrame | None, log_px_frame: pd.DataFrame | None,
           curve_rows: pd.DataFrame | None, dataset, training: dict, calibration_result: dict | None) -> dict | None:
    """datapoints.csv (everything per datapoint, with log p_hat(x), the three gaps and numerical faults),
    summary.json, table.md and figures/ (rank 0)."""
    def compute() -> dict:
        frame = datapoints_frame(run, pilot, log_px_frame)
        io.write_csv(run.dir / "datapoints.csv", frame)
        summary = run_summary(run.config, frame, x, dataset, training, run.device)
        if calibration_result is not None:
            summary["ais_calibration"] = calibration_result
        if curve_rows is not None:
            summary["curve"] = summarize_curve(curve_rows, pilot[Q_STAR_FFG].to_numpy())
        io.write_json(run.dir / "summary.json", summary)
        io.write_text(run.dir / "table.md", gap_table_markdown(summary))
        write_figures(run, frame, summary)
        log_left_out(run, summary)
        return summary
    return rank0_stage(run, "report", compute, lambda: read_summary_of(run.dir))


def datapoints_frame(run: Run, pilot: pd.DataFrame, log_px_frame: pd.DataFrame) -> pd.DataFrame:
    """The pilot bounds and log p_hat(x) side by side, with the gaps of the encoder's family and the faults."""
    frame = join_on_index([pilot, log_px_frame])
    own = run.config.model.posterior  # the run's gaps compare L[q] with L[q*] of the encoder's family
    for column in ("elbo_q_star", "elbo_q_star_stderr", "elbo_q_star_ess", "refine_steps", "refine_converged",
                   "refine_diverged"):
        frame[column] = frame[family_column(column, own)]
    frame = decompose(frame)
    flags = tuple(f"refine_diverged_{f}" for f in run.config.refine.families)
    frame["fault"] = find_faults(frame, ("elbo_q", "elbo_q_star", *log_px_candidates(run.config), "log_px"),
                                 flags=flags)
    return frame


def write_figures(run: Run, frame: pd.DataFrame, summary: dict) -> None:
    """figures/ of the report, unless --no-figures; a redone report leaves no figures of the last one."""
    shutil.rmtree(run.dir / "figures", ignore_errors=True)
    if run.figures:
        from gapbench.report.figures.common import write_run_figures
        run.log("[report] figures: " + ", ".join(p.name for p in write_run_figures(run.dir, frame, summary)
                                                 if p.suffix == ".png") + f" in {run.dir / 'figures'}")


def log_left_out(run: Run, summary: dict) -> None:
    """Say how many datapoints' AIS was flagged unhealthy, and how many had numerical faults."""
    faults = summary["faults"]
    if run.config.ais.enabled and summary["ais"]["unhealthy"]["num_unhealthy"]:
        unhealthy = summary["ais"]["unhealthy"]
        run.log(f"[report] AIS was flagged unhealthy for {unhealthy['num_unhealthy']} of "
                f"{faults['num_datapoints']} "
                f"datapoints ({', '.join(f'{k}: {v}' for k, v in unhealthy.items() if k != 'num_unhealthy')}); "
                f"their AIS is left out of log p_hat(x) (datapoints.csv, column {UNHEALTHY})")
    if faults["num_faulty"]:
        run.log(f"[report] {faults['num_faulty']} of {faults['num_datapoints']} datapoints had numerical "
                f"faults ({', '.join(f'{k}: {v}' for k, v in faults['counts'].items())}); they are left "
                "out of the means and flagged in datapoints.csv, column fault")


def family_column(column: str, family: str) -> str:
    """The local.csv column of ``family`` for an unsuffixed name: elbo_q_star_stderr ->
    elbo_q_star_<family>_stderr, refine_steps -> refine_steps_<family>."""
    return column.replace("q_star", f"q_star_{family}") if "q_star" in column else f"{column}_{family}"


def cpu_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in tensors.items()}
