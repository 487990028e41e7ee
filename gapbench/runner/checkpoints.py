"""Checkpoints of a run folder: loaded with ``torch.load(weights_only=True)`` and checked before use.

``weights_only=True`` unpickles tensors, numbers, strings and plain containers only, so a file that
would run code when unpickled (or holds any other Python object) is refused, never executed.

    checkpoint.pt    the best decoder and encoder weights, the config and the data size
    train_state.pt   training's resume point (see ``gapbench.train.train_state``) with the sha256
                     of the config sections training depends on
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from gapbench.runner import migrate
from gapbench.runner.rundir import RunError

CHECKPOINT_FORMAT = "gapbench-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_KEYS = ("format", "config", "data_size", "decoder", "encoder", "best_epoch", "best_valid_elbo",
                   "epochs_run")


def safe_load(path: str | Path, what: str, fix: str) -> object:
    """``torch.load(path, weights_only=True)`` on CPU, every failure as a RunError naming ``path``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights_only" not in str(error) and "Weights only" not in str(error):
            raise RunError(f"{path} is not a readable {what} (the file is damaged or of another kind); {fix}") from None
        raise RunError(
            f"{path} is not a {what}: it holds Python objects other than tensors and numbers, which "
            f"torch.load(weights_only=True) refuses to unpickle (such a file could run code when "
            f"loaded; gapbench never loads it); {fix}"
        ) from None
    except Exception as error:  # a truncated zip, not a torch file at all, an unreadable file
        detail = str(error).strip().splitlines()[0].split(". ")[0] if str(error).strip() else type(error).__name__
        raise RunError(f"{path} is not a readable {what}: the file is damaged, cut short or not a torch file "
                       f"({detail}); {fix}") from None


def load_checkpoint(path: str | Path, config=None, data_size: int | None = None) -> dict:
    """Load a gapbench checkpoint safely and check that it fits ``config`` (an ExperimentConfig)
    and data of ``data_size`` pixels; RunError with the fix otherwise."""
    fix = "delete it to retrain, or point to the right run folder"
    checkpoint = safe_load(path, "gapbench checkpoint", fix)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise RunError(f"{path} is not a gapbench checkpoint (no 'format': '{CHECKPOINT_FORMAT}' entry); {fix}")
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise RunError(f"{path} is an incomplete gapbench checkpoint (missing {', '.join(missing)}); {fix}")
    if data_size is not None and checkpoint["data_size"] != data_size:
        raise RunError(f"{path} was trained on data of {checkpoint['data_size']} pixels, but this dataset has "
                       f"{data_size}; use a new --out folder for this dataset, or delete it to retrain")
    if config is not None:
        saved, current = checkpoint["config"], config.model_dump(mode="json")
        if not isinstance(saved, dict):
            raise RunError(f"{path} holds no config; {fix}")
        saved = migrate.checkpoint_config(saved, path)
        for key in ("seed", "data", "model", "train"):
            if saved.get(key) != current[key]:
                raise RunError(f"{path} was trained with a different [{key}] config; "
                               "use a new --out folder, or delete it to retrain")
    return checkpoint


def load_weights(path: str | Path, checkpoint: dict, decoder: nn.Module, encoder: nn.Module) -> None:
    """Load the checkpoint's weights into the networks; RunError if their shapes do not fit."""
    try:
        decoder.load_state_dict(checkpoint["decoder"])
        encoder.load_state_dict(checkpoint["encoder"])
    except (RuntimeError, TypeError, AttributeError) as error:
        first = str(error).strip().splitlines()
        raise RunError(f"{path} does not fit the networks of this config ({first[-1].strip() if first else error}); "
                       "delete it to retrain, or point to the right run folder") from None
    decoder.eval(), encoder.eval()


def load_train_state(path: str | Path, config_sha256: str) -> dict | None:
    """Training's resume point, or None when it belongs to another config (it is then ignored)."""
    state = safe_load(path, "gapbench training state", "delete it to start training from scratch")
    if not isinstance(state, dict) or "config_sha256" not in state:
        raise RunError(f"{path} is not a gapbench training state; delete it to start training from scratch")
    return state if state["config_sha256"] == config_sha256 else None
