"""External models: a user's decoder and encoder, built by a factory an experiment file names.

    [model]
    factory = "my_model:make"        # "package.module:function", importable or found in factory_path
    factory_path = "experiments"     # optional: a folder put first on sys.path
    checkpoint = "weights.pt"        # optional: a file passed to the factory, make(checkpoint)

The factory is called as ``make(checkpoint)`` (a ``pathlib.Path``) when ``model.checkpoint`` is given,
else as ``make()``, and returns ``(model, encoder)``:

- ``model`` has ``log_prior(z) -> (K, B)`` and ``log_likelihood(x, z) -> (K, B)`` for z (K, B, Z) and
  x (B, D) (the Model protocol of ``gapbench.measure``), differentiable in z;
- ``encoder`` maps x (B, D) to a torch Distribution with batch shape (B,) and event shape (Z,), or a
  gapbench Posterior (``gapbench.posteriors.as_posterior``).

Before any stage runs, :func:`check_external` makes one small forward and backward pass on two
datapoints, so a factory that cannot be imported, returns the wrong things, or whose shapes do not
fit the data stops the run with one message (exit 2) before anything is written. The run records
the factory, its module's file and sha256, the checkpoint's sha256 (a folder's: of its files) in
``model.checkpoint_sha256``, part of every stage's config hash, so a changed checkpoint never reuses
old results, and versions.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import sys
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from gapbench.runner.config import ConfigError, ExperimentConfig
from gapbench.outputs import sha256_file
from gapbench.posteriors import as_posterior

PROBE_DATAPOINTS = 2  # datapoints of the forward pass that checks a factory's networks
PROBE_SAMPLES = 3  # z samples per datapoint in that pass


class ExternalModelError(ConfigError):
    """An external model that cannot be used; the message names the problem and the fix (exit 2)."""


class ExternalModel(NamedTuple):
    model: Any  # log_prior(z) -> (K, B), log_likelihood(x, z) -> (K, B)
    encoder: Callable  # x (B, D) -> Distribution or Posterior
    record: dict  # JSON: factory, module file and sha256, checkpoint and sha256, versions


def path_sha256(path: str | Path) -> str:
    """sha256 of a file; of a folder (e.g. a pythae model folder), the sha256 of its files' relative paths
    and sha256s, in sorted order."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    lines = [f"{p.relative_to(path).as_posix()} {sha256_file(p)}\n" for p in sorted(path.rglob("*")) if p.is_file()]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def with_checkpoint_sha256(config: ExperimentConfig) -> ExperimentConfig:
    """``config`` with ``model.checkpoint_sha256`` filled in from the checkpoint file; one pinned in the
    experiment file must match it. The sha256 is part of every stage's config hash."""
    model = config.model
    if model.factory is None or model.checkpoint is None:
        return config
    path = Path(model.checkpoint)
    if not path.exists():
        raise ExternalModelError(f"model.checkpoint {path} does not exist; give the path of the file (or folder) the "
                                 f"factory {model.factory} loads (relative paths are read from the current directory)")
    sha256 = path_sha256(path)
    if model.checkpoint_sha256 is not None and model.checkpoint_sha256 != sha256:
        raise ExternalModelError(f"model.checkpoint {path} has sha256 {sha256}, but the experiment pins "
                                 f"model.checkpoint_sha256 = {model.checkpoint_sha256}; point to the pinned file, or "
                                 "update (or remove) model.checkpoint_sha256")
    return config.model_copy(update={"model": model.model_copy(update={"checkpoint_sha256": sha256})})


def import_factory(spec: str, factory_path: str | None = None) -> Callable:
    """The function ``spec`` = "package.module:function"; ``factory_path`` goes first on sys.path."""
    module_name, _, function_name = spec.partition(":")
    if factory_path is not None:
        folder = Path(factory_path)
        if not folder.is_dir():
            raise ExternalModelError(f"model.factory_path {folder} is not a folder; give the folder that holds "
                                     f"{module_name.split('.')[0]}.py (relative to the current directory)")
        if str(folder.resolve()) not in sys.path:
            sys.path.insert(0, str(folder.resolve()))
    where = f" or put {module_name.replace('.', '/')}.py in model.factory_path" if factory_path is None else \
        f" (looked first in model.factory_path = {factory_path})"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is not None and module_name.startswith(error.name):
            raise ExternalModelError(f"model.factory = {spec!r}: no module named {module_name!r}; install it{where}"
                                     ) from None
        raise ExternalModelError(f"model.factory = {spec!r}: importing {module_name} failed ({error}); install "
                                 f"the package it needs") from None
    except Exception as error:  # the user's module raised while it was imported
        raise ExternalModelError(f"model.factory = {spec!r}: importing {module_name} raised "
                                 f"{type(error).__name__}: {error}; fix the module") from None
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise ExternalModelError(f"model.factory = {spec!r}: module {module_name} ({getattr(module, '__file__', '')}) "
                                 f"has no function {function_name!r}; name a function defined there")
    return factory


def build_external(spec: str, *, factory_path: str | None = None, checkpoint: str | None = None,
                   device: torch.device | str = "cpu") -> ExternalModel:
    """Import and call the factory; check that it returned a model and an encoder (not yet their shapes:
    see :func:`check_external`). nn.Modules are moved to ``device`` and put in eval mode."""
    factory = import_factory(spec, factory_path)
    try:
        built = factory(Path(checkpoint)) if checkpoint is not None else factory()
    except Exception as error:
        raise ExternalModelError(f"model.factory = {spec!r} raised {type(error).__name__}: {error}; fix the factory"
                                 f"{'' if checkpoint is None else f' or model.checkpoint = {checkpoint!r}'}") from None
    if not isinstance(built, (tuple, list)) or len(built) != 2:
        raise ExternalModelError(f"model.factory = {spec!r} returned {_describe(built)}; it must return a pair "
                                 "(model, encoder): return model, encoder")
    model, encoder = built
    missing = [name for name in ("log_prior", "log_likelihood") if not callable(getattr(model, name, None))]
    if missing:
        raise ExternalModelError(f"model.factory = {spec!r}: the model ({type(model).__name__}, first of the pair) has "
                                 f"no method {' or '.join(missing)}; give it log_prior(z) -> (K, B) and "
                                 "log_likelihood(x, z) -> (K, B), or return (model, encoder) in this order")
    if not callable(encoder):
        raise ExternalModelError(f"model.factory = {spec!r}: the encoder ({type(encoder).__name__}, second of the "
                                 "pair) is not callable; return a function or nn.Module mapping x (B, D) to a torch "
                                 "Distribution over z")
    for part in (model, encoder):
        if isinstance(part, nn.Module):
            part.to(device).eval()
    module = sys.modules[factory.__module__]
    source = inspect.getsourcefile(module) if hasattr(module, "__file__") else None
    record = {"factory": spec, "factory_path": factory_path, "module_file": source,
              "module_sha256": sha256_file(source) if source else None,
              "checkpoint": checkpoint, "checkpoint_sha256": path_sha256(checkpoint) if checkpoint else None,
              "versions": _versions(factory.__module__)}
    return ExternalModel(model, encoder, record)


def check_external(external: ExternalModel, x: torch.Tensor, *, spec: str) -> int:
    """One forward and backward pass on x (B, D), B small: the encoder's posterior gives z (K, B, Z) and
    log q (K, B); log_prior and log_likelihood give finite (K, B) values, differentiable in z. Returns Z.
    ExternalModelError naming the part that does not fit otherwise."""
    model, encoder = external.model, external.encoder
    batch_size, data_size = x.shape
    what = f"model.factory = {spec!r}"
    fits = f"the factory's networks must take x of shape (B, {data_size}) (the data's D = {data_size})"
    try:
        with torch.no_grad():
            output = encoder(x)
    except Exception as error:
        raise ExternalModelError(f"{what}: the encoder failed on x of shape {(batch_size, data_size)} "
                                 f"({type(error).__name__}: {error}); {fits}") from None
    k = PROBE_SAMPLES
    try:
        posterior = as_posterior(output)
        z, log_q = posterior.rsample_and_log_prob(k, generator=torch.Generator(x.device).manual_seed(0))
    except Exception as error:
        raise ExternalModelError(f"{what}: the encoder's output for x of shape {(batch_size, data_size)} is unusable "
                                 f"({type(error).__name__}: {error}); return "
                                 "torch.distributions.Independent(Normal(mu, sigma), 1) or another "
                                 "Distribution with batch shape (B,) and event shape (Z,)") from None
    if z.ndim != 3 or z.shape[:2] != (k, batch_size) or tuple(log_q.shape) != (k, batch_size):
        raise ExternalModelError(f"{what}: the encoder's posterior gave z of shape {tuple(z.shape)} and log q of shape "
                                 f"{tuple(log_q.shape)} for {batch_size} datapoints; expected "
                                 f"({k}, {batch_size}, Z) and ({k}, {batch_size}): "
                                 "one distribution per row of x, with event shape (Z,)")
    z = z.detach().requires_grad_(True)  # (K, B, Z)
    values = {}
    for name, fn in (("log_prior", lambda: model.log_prior(z)), ("log_likelihood", lambda: model.log_likelihood(x, z))):
        try:
            values[name] = fn()
        except Exception as error:
            raise ExternalModelError(f"{what}: model.{name} failed on z of shape {tuple(z.shape)}"
                                     + (f" and x of shape {(batch_size, data_size)}" if name == "log_likelihood" else "")
                                     + " "
                                     f"({type(error).__name__}: {error}); {fits} and z of the encoder's "
                                     f"Z = {z.shape[-1]}") from None
        value = values[name]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != (k, batch_size):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ExternalModelError(f"{what}: model.{name} returned {shape} for z of shape {tuple(z.shape)}; it must "
                                     f"return one value per sample and datapoint, shape ({k}, {batch_size}) (sum over "
                                     "the "
                                     "dimensions of z and x, not over samples or datapoints)")
        if not torch.isfinite(value).all():
            raise ExternalModelError(f"{what}: model.{name} returned NaN or infinite values on the data; check the "
                                     "factory's weights and that the data are in the domain the model was trained on")
    total = values["log_prior"].sum() + values["log_likelihood"].sum()
    if not total.requires_grad:
        raise ExternalModelError(f"{what}: log_prior(z) + log_likelihood(x, z) carries no gradient in z; local "
                                 "refinement and AIS need it: compute them with torch operations on z")
    (grad,) = torch.autograd.grad(total, z, allow_unused=True)
    if grad is None or not torch.isfinite(grad).all():
        raise ExternalModelError(f"{what}: the gradient of log_prior + log_likelihood in z is missing or not finite; "
                                 "compute them with torch operations on z")
    return int(z.shape[-1])


def _describe(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"


def _versions(module_name: str) -> dict[str, str]:
    """``__version__`` of the factory's top-level package and of known VAE libraries that are loaded."""
    from importlib import metadata

    versions = {}
    for name in dict.fromkeys((module_name.split(".")[0], "pythae")):
        if name not in sys.modules:
            continue
        try:
            versions[name] = metadata.version(name)  # the installed distribution's
        except metadata.PackageNotFoundError:  # a plain module or folder: its __version__, if any
            version = getattr(sys.modules[name], "__version__", None)
            if isinstance(version, str):
                versions[name] = version
    return versions
