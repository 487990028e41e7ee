"""The staged runner: train -> amortized -> local -> ais -> report, one folder per run.

Each stage writes its outputs atomically and is skipped on rerun when they exist, so an interrupted
run resumes where it stopped. The folder records the resolved config; a rerun with a different config
is refused unless ``force`` is given.

Files of a run folder:
    config.json        the resolved configuration (every default filled in)
    checkpoint.pt      best decoder and encoder weights, with the config (torch.load(weights_only=True))
    train_history.csv  one row per epoch
    amortized.csv      per datapoint: L[q] and IWAE under q, with standard errors and ESS
    local.csv, local.pt   per datapoint: L[q*], IWAE under q*, refinement steps; the q* parameters
    ais.csv            per datapoint: AIS estimate of log p(x) with standard error, ESS and HMC diagnostics
    datapoints.csv     everything per datapoint, with log p_hat(x) and the three gaps
    summary.json       means with standard errors, and every setting that changes a number
    table.md           the gap table
    stages.json        which stages finished, when, and how long they took
"""

from __future__ import annotations

import hashlib
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from . import io
from .config import ConfigError, ExperimentConfig
from .data import Dataset, binarize, load_dataset
from .gaps import best_bound, decompose, estimate_columns, summarize, summarize_column
from .measure import ais_diagnostics, ais_of, bounds_of, local_posterior
from .models import Decoder
from .posteriors import GaussianEncoder, get_family
from .report import gap_table_markdown
from .train import train

CHECKPOINT_FORMAT = "gapbench-checkpoint"
CHECKPOINT_VERSION = 1
STAGES = ("train", "amortized", "local", "ais", "report")
LOG_PX_CANDIDATES = ("iwae_q", "iwae_q_star")
STAGE_STREAMS = {"train": 1, "amortized": 2, "local": 3, "report": 4, "ais": 5}  # fixed: adding a stage changes no stream


class RunError(RuntimeError):
    """A run that cannot go on as asked (folder clash, unusable checkpoint); the message says why."""


def stage_generator(seed: int, stage: str) -> torch.Generator:
    """An independent random stream per (seed, stage), so a resumed stage repeats exactly."""
    state = np.random.SeedSequence([seed, STAGE_STREAMS[stage]]).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def build_networks(config: ExperimentConfig, data_size: int) -> tuple[Decoder, GaussianEncoder]:
    """Decoder and encoder initialised from the run seed, without touching torch's global stream."""
    m = config.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        decoder = Decoder(data_size, m.latent_size, tuple(m.decoder_hidden), m.activation)
        encoder = GaussianEncoder(data_size, m.latent_size, tuple(m.encoder_hidden), m.activation)
    return decoder, encoder


def evaluation_data(config: ExperimentConfig, dataset: Dataset) -> torch.Tensor:
    """The first ``num_datapoints`` of the chosen split, binarised once with a fixed stream."""
    split = dataset.split(config.eval.split)
    n = config.eval.num_datapoints
    if n > split.shape[0]:
        raise ConfigError(
            f"eval.num_datapoints = {n}, but the {dataset.name} {config.eval.split} split has only "
            f"{split.shape[0]} datapoints; lower eval.num_datapoints or choose another eval.split"
        )
    generator = torch.Generator().manual_seed(config.seed)
    return binarize(split[:n], mode=config.data.binarization, threshold=config.data.threshold,
                    generator=generator)


def versions() -> dict[str, str]:
    from . import __version__
    return {"gapbench": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "pandas": pd.__version__}


class Run:
    """One run folder and the stages that fill it."""

    def __init__(self, config: ExperimentConfig, out_dir: str | Path, *, force: bool = False,
                 progress: bool = True, log: Callable[[str], None] = print):
        self.config = config
        self.dir = Path(out_dir)
        self.force = force
        self.progress = progress
        self.log = log
        self.stages: dict[str, dict] = {}

    # --- folder bookkeeping -------------------------------------------------------------------
    def prepare(self) -> None:
        """Create the folder (or check the config of an existing one) and record the config."""
        resolved = self.config.model_dump(mode="json")
        config_path = self.dir / "config.json"
        if config_path.exists() and not self.force:
            previous = _comparable_previous(config_path, resolved)
            if previous != resolved:
                changed = sorted(_diff_keys(previous, resolved))
                raise RunError(
                    f"{self.dir} holds a run with a different config (changed: {', '.join(changed)}); "
                    "choose another --out, or pass --force to redo the run with the new config"
                )
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            io.write_json(config_path, resolved)
        except OSError as error:
            raise RunError(f"cannot write the run folder {self.dir}: {error.strerror}; choose a writable --out") from None
        stages_path = self.dir / "stages.json"
        if stages_path.exists() and not self.force:
            import json
            self.stages = json.loads(stages_path.read_text())
        if self.force:
            for name in ("checkpoint.pt", "amortized.csv", "local.csv", "local.pt", "ais.csv", "stages.json"):
                (self.dir / name).unlink(missing_ok=True)
            self.stages = {}

    def finish_stage(self, name: str, seconds: float) -> None:
        self.stages[name] = {"seconds": round(seconds, 3),
                             "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        io.write_json(self.dir / "stages.json", self.stages)

    # --- stages -------------------------------------------------------------------------------
    def train_stage(self, dataset: Dataset) -> tuple[Decoder, GaussianEncoder, dict]:
        path = self.dir / "checkpoint.pt"
        decoder, encoder = build_networks(self.config, dataset.data_size)
        if path.exists():
            self.log(f"[train] skipped: {path} exists")
            checkpoint = load_checkpoint(path, self.config, dataset.data_size)
        else:
            t = self.config.train
            start = time.perf_counter()
            result = train(
                decoder, encoder, dataset.train, dataset.valid, epochs=t.epochs, batch_size=t.batch_size,
                learning_rate=t.learning_rate, adam_eps=t.adam_eps, warmup_epochs=t.warmup_epochs, schedule=t.schedule,
                binarization=self.config.data.binarization, threshold=self.config.data.threshold,
                valid_every=t.valid_every, valid_num_samples=t.valid_num_samples,
                early_stopping_patience=t.early_stopping_patience,
                generator=stage_generator(self.config.seed, "train"), progress=self.progress,
            )
            checkpoint = {
                "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
                "config": self.config.model_dump(mode="json"), "data_size": dataset.data_size,
                "decoder": result.decoder_state, "encoder": result.encoder_state,
                "best_epoch": result.best_epoch, "best_valid_elbo": result.best_valid_elbo,
                "epochs_run": len(result.history),
            }
            io.write_csv(self.dir / "train_history.csv", pd.DataFrame([r._asdict() for r in result.history]))
            io.save_torch(path, checkpoint)
            self.finish_stage("train", time.perf_counter() - start)
            self.log(f"[train] best validation ELBO {result.best_valid_elbo:.3f} at epoch {result.best_epoch}")
        decoder.load_state_dict(checkpoint["decoder"])
        encoder.load_state_dict(checkpoint["encoder"])
        decoder.eval(), encoder.eval()
        info = {k: checkpoint[k] for k in ("best_epoch", "best_valid_elbo", "epochs_run")}
        return decoder, encoder, info

    def _batches(self, x: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        size = self.config.eval.batch_size
        return [(start, x[start:start + size]) for start in range(0, x.shape[0], size)]

    def amortized_stage(self, decoder, encoder, x: torch.Tensor) -> pd.DataFrame:
        path = self.dir / "amortized.csv"
        if path.exists():
            self.log(f"[amortized] skipped: {path} exists")
            return io.read_csv(path)
        from tqdm.auto import tqdm
        e = self.config.eval
        start = time.perf_counter()
        generator = stage_generator(self.config.seed, "amortized")
        frames = []
        for _, batch in tqdm(self._batches(x), desc="L[q], IWAE", unit="batch", disable=not self.progress):
            with torch.no_grad():
                q = encoder(batch)
            pair = bounds_of(decoder, q, batch, num_samples=e.num_samples, chunk_size=e.chunk_size,
                             generator=generator)
            frames.append(pd.DataFrame({**estimate_columns("elbo_q", pair.elbo),
                                        **estimate_columns("iwae_q", pair.iwae)}))
        frame = pd.concat(frames, ignore_index=True)
        io.write_csv(path, frame)
        self.finish_stage("amortized", time.perf_counter() - start)
        return frame

    def local_stage(self, decoder, encoder, x: torch.Tensor) -> pd.DataFrame:
        path = self.dir / "local.csv"
        if path.exists() and (self.dir / "local.pt").exists():
            self.log(f"[local] skipped: {path} exists")
            return io.read_csv(path)
        from tqdm.auto import tqdm
        e, r = self.config.eval, self.config.refine
        procedure = r.resolved()
        family = get_family(r.family)
        start = time.perf_counter()
        generator = stage_generator(self.config.seed, "local")
        frames, params = [], []
        for offset, batch in self._batches(x):
            with tqdm(desc=f"refine q* [{offset}:{offset + batch.shape[0]}]", unit="step",
                      disable=not self.progress) as bar:
                def callback(step: int, num_active: int) -> None:
                    bar.update(1)
                    bar.set_postfix(active=num_active)
                result = local_posterior(decoder, encoder, batch, family=r.family, init=r.init,
                                         procedure=procedure, generator=generator, callback=callback)
            pair = bounds_of(decoder, family.posterior(result.params), batch, num_samples=e.num_samples,
                             chunk_size=e.chunk_size, generator=generator)
            frames.append(pd.DataFrame({
                **estimate_columns("elbo_q_star", pair.elbo), **estimate_columns("iwae_q_star", pair.iwae),
                "refine_steps": result.num_steps.numpy(), "refine_converged": result.is_converged.numpy(),
            }))
            params.append(result.params)
        frame = pd.concat(frames, ignore_index=True)
        io.save_torch(self.dir / "local.pt", {k: torch.cat([p[k] for p in params]) for k in params[0]})
        io.write_csv(path, frame)
        self.finish_stage("local", time.perf_counter() - start)
        return frame

    def ais_stage(self, decoder, encoder, x: torch.Tensor) -> pd.DataFrame | None:
        """AIS from the configured start for every datapoint; None when ``ais.enabled`` is false."""
        a = self.config.ais
        if not a.enabled:
            return None
        path = self.dir / "ais.csv"
        if path.exists():
            self.log(f"[ais] skipped: {path} exists")
            return io.read_csv(path)
        from tqdm.auto import tqdm
        family = get_family(self.config.refine.family)
        q_star_params = torch.load(self.dir / "local.pt", weights_only=True) if a.init == "q_star" else None
        start = time.perf_counter()
        generator = stage_generator(self.config.seed, "ais")
        frames = []
        for offset, batch in self._batches(x):
            q_star = None
            if q_star_params is not None:
                q_star = family.posterior({k: v[offset:offset + batch.shape[0]] for k, v in q_star_params.items()})
            with tqdm(total=a.num_steps, desc=f"AIS [{offset}:{offset + batch.shape[0]}]", unit="step",
                      disable=not self.progress) as bar:
                estimate = ais_of(decoder, batch, init=a.init, encoder=encoder, q_star=q_star,
                                  procedure=a.procedure(), generator=generator, callback=lambda t: bar.update(1))
            frames.append(pd.DataFrame({**estimate_columns("ais", estimate),
                                        **{k: v.numpy() for k, v in ais_diagnostics(estimate).items()}}))
        frame = pd.concat(frames, ignore_index=True)
        io.write_csv(path, frame)
        self.finish_stage("ais", time.perf_counter() - start)
        return frame

    def report_stage(self, x: torch.Tensor, amortized: pd.DataFrame, local: pd.DataFrame,
                     ais: pd.DataFrame | None, dataset: Dataset, training: dict) -> dict:
        frame = pd.concat([amortized, local] + ([ais] if ais is not None else []), axis=1)
        frame = decompose(pd.concat([frame, best_bound(frame, self.log_px_candidates)], axis=1))
        frame.insert(0, "index", np.arange(len(frame)))
        io.write_csv(self.dir / "datapoints.csv", frame)
        summary = self.summary(frame, x, dataset, training)
        io.write_json(self.dir / "summary.json", summary)
        io.write_text(self.dir / "table.md", gap_table_markdown(summary))
        self.finish_stage("report", 0.0)
        return summary

    @property
    def log_px_candidates(self) -> tuple[str, ...]:
        return LOG_PX_CANDIDATES + (("ais",) if self.config.ais.enabled else ())

    def summary(self, frame: pd.DataFrame, x: torch.Tensor, dataset: Dataset, training: dict) -> dict:
        c = self.config
        summary = summarize(frame)
        summary["other_bounds"] = {name: summarize_column(frame[name], frame[f"{name}_stderr"])
                                   for name in self.log_px_candidates}
        summary["log_px_source_counts"] = {k: int(v) for k, v in frame["log_px_source"].value_counts().items()}
        summary["refinement"] = {
            "mean_steps": float(frame["refine_steps"].mean()),
            "max_steps_taken": int(frame["refine_steps"].max()),
            "converged_fraction": float(frame["refine_converged"].mean()),
        }
        if c.ais.enabled:
            summary["ais"] = {
                "mean_acceptance_rate": float(frame["ais_acceptance_rate"].mean()),
                "mean_step_size": float(frame["ais_step_size"].mean()),
                "mean_divergence_rate": float(frame["ais_divergence_rate"].mean()),
                "mean_ess": float(frame["ais_ess"].mean()),
                "min_ess": float(frame["ais_ess"].min()),
            }
        summary["settings"] = {
            "name": c.name,
            "seed": c.seed,
            "dataset": dataset.name,
            "split": c.eval.split,
            "num_datapoints": c.eval.num_datapoints,
            "datapoints": f"the first {c.eval.num_datapoints} of the {c.eval.split} split",
            "binarization": {"mode": c.data.binarization, "threshold": c.data.threshold,
                             "evaluation_stream_seed": c.seed if c.data.binarization == "dynamic" else None},
            "evaluation_data_sha256": hashlib.sha256(x.numpy().tobytes()).hexdigest(),
            "num_samples": {"elbo": c.eval.num_samples, "iwae_k": c.eval.num_samples,
                            "elbo_and_iwae_share_samples": True},
            "chunk_size": c.eval.chunk_size,
            "log_px": "per-datapoint max of " + ", ".join(self.log_px_candidates),
            "refinement": {"family": c.refine.family, "init": c.refine.init,
                           "preset": c.refine.procedure, **c.refine.resolved()._asdict()},
            "ais": c.ais.model_dump(mode="json"),
            "model": c.model.model_dump(mode="json"),
            "train": c.train.model_dump(mode="json"),
        }
        summary["training"] = training
        summary["data"] = dataset.provenance
        summary["versions"] = versions()
        return summary

    def execute(self) -> dict:
        """Run every stage that has not finished yet; returns the summary."""
        dataset = load_dataset(self.config.data.dataset, data_dir=self.config.data.data_dir,
                               download=self.config.data.download)
        x = evaluation_data(self.config, dataset)  # checked before anything is written
        self.prepare()
        with torch.random.fork_rng(devices=[]):
            decoder, encoder, training = self.train_stage(dataset)
            amortized = self.amortized_stage(decoder, encoder, x)
            local = self.local_stage(decoder, encoder, x)
            ais = self.ais_stage(decoder, encoder, x)
            return self.report_stage(x, amortized, local, ais, dataset, training)


def load_checkpoint(path: str | Path, config: ExperimentConfig | None = None,
                    data_size: int | None = None) -> dict:
    """Load a gapbench checkpoint safely (weights_only) and check it fits the config and data."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling refused, truncated file, not a torch file
        raise RunError(f"{path} is not a readable gapbench checkpoint ({type(error).__name__}); "
                       "delete it to retrain, or point to the right run folder") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise RunError(f"{path} is not a gapbench checkpoint; delete it to retrain")
    if data_size is not None and checkpoint["data_size"] != data_size:
        raise RunError(f"{path} was trained on data of size {checkpoint['data_size']}, not {data_size}; "
                       "use a new --out folder for this dataset")
    if config is not None:
        saved = checkpoint["config"]
        current = config.model_dump(mode="json")
        for key in ("model", "data", "train", "seed"):
            if saved.get(key) != current[key]:
                raise RunError(f"{path} was trained with a different [{key}] config; "
                               "use a new --out folder or --force to retrain")
    return checkpoint


def _comparable_previous(config_path: Path, current: dict) -> dict:
    """The config recorded in a run folder, made comparable with ``current``: keys it lacks take this
    version's defaults, and a whole section it lacks (one added since, such as ``[ais]``) takes the
    current value, since nothing in that folder depends on it: an older folder resumes and only the
    new stage runs."""
    import json

    from .config import parse_config
    raw = json.loads(config_path.read_text())
    try:
        previous = parse_config(raw, source=str(config_path)).model_dump(mode="json")
    except ConfigError:
        return raw
    for section, value in current.items():
        if section not in raw:
            previous[section] = value
    return previous


def _diff_keys(a: dict, b: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k in set(a) | set(b):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys |= _diff_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.add(prefix + k)
    return keys


def run_experiment(config: ExperimentConfig, out_dir: str | Path, *, force: bool = False,
                   progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) an experiment into ``out_dir``; returns the summary dict."""
    return Run(config, out_dir, force=force, progress=progress, log=log).execute()




def open_run_config(run_dir: str | Path) -> ExperimentConfig:
    """A trained run's config; keys this version does not know are ignored with a warning, and
    sections it lacks take their defaults, so folders written by other versions load."""
    from .config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file() or not (run_dir / "checkpoint.pt").is_file():
        raise RunError(f"{run_dir} is not a trained gapbench run (no config.json and checkpoint.pt); "
                       "train one with `gapbench run EXPERIMENT.toml --out DIR` first")
    return load_config(run_dir / "config.json", ignore_unknown=True)


def open_run(run_dir: str | Path, *, num_datapoints: int | None = None
             ) -> tuple[ExperimentConfig, Decoder, GaussianEncoder, torch.Tensor]:
    """A trained run's config, networks (eval mode) and evaluation datapoints (N, D).

    ``num_datapoints`` replaces the run's ``eval.num_datapoints`` (same split, same binarisation).
    """
    run_dir = Path(run_dir)
    config = open_run_config(run_dir)
    dataset = load_dataset(config.data.dataset, data_dir=config.data.data_dir, download=config.data.download)
    checkpoint = load_checkpoint(run_dir / "checkpoint.pt", config, dataset.data_size)
    decoder, encoder = build_networks(config, dataset.data_size)
    decoder.load_state_dict(checkpoint["decoder"])
    encoder.load_state_dict(checkpoint["encoder"])
    decoder.eval(), encoder.eval()
    if num_datapoints is not None:
        config = config.model_copy(update={"eval": config.eval.model_copy(update={"num_datapoints": num_datapoints})})
    return config, decoder, encoder, evaluation_data(config, dataset)
