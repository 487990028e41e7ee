"""Will a run fit in memory? The largest arrays of each stage, counted from the config, against
the memory the device has free, so that an impossible size is refused (exit 2, with the keys to
lower) before any stage runs and before ``--force`` moves anything aside.

The estimate counts what grows with the settings, in float32 (4 bytes a value), and nothing else
(the interpreter, torch's own buffers, the dataset already loaded):

    train      weights x 6 (value, gradient, two Adam moments, the best copy, the saved state)
               + one minibatch of activations (train.batch_size rows, twice for autograd)
    amortized  weights + one chunk of samples: min(eval.num_samples, chunk) x B rows of activations
    local      weights + refinement: refine.num_samples x B rows with gradient, then the IWAE chunk
    ais        weights + the chains' state: ais.num_chains x B x Z x 8 values (z, momentum, gradient,
               the proposal's three, the log weights and the log density) + one chunk of chains' activations
    curve      weights + curve.num_samples x B rows with gradient

with B = min(eval.batch_size, eval.num_datapoints) datapoints evaluated together, Z the latent size
(Z1 + Z2 for the two-layer model), and a row of activations ``gapbench.runner.device.row_bytes``. Free
memory: ``MemAvailable`` of /proc/meminfo (else ``os.sysconf``) on a CPU, ``torch.cuda.mem_get_info``
on a GPU. A stage whose count exceeds it is refused; the count is a floor of what the stage needs,
so a refusal is never a false alarm about the arrays it names.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from gapbench.runner.device import BYTES_PER_VALUE, row_bytes
from gapbench.estimators.log_weights import DEFAULT_ROWS_PER_CHUNK

AIS_STATE_VALUES = 8  # values per (chain, datapoint, latent dimension) AIS keeps (see the module docstring)
TRAIN_WEIGHT_COPIES = 6  # weights, gradients, Adam's two moments, best weights, the saved training state


class StageMemory(NamedTuple):
    stage: str
    num_bytes: int  # estimated peak bytes of the stage's largest arrays
    what: str  # the sizes that make it, for the message
    fix: str  # the keys to lower


def activation_widths(config, data_size: int) -> tuple[int, list[int]]:
    """(Z, hidden widths) of one decoder evaluation, as ``gapbench.runner.device.row_bytes`` takes them: the
    two-layer model adds Z2 and the network of p(z1|z2); a convolutional decoder its feature maps."""
    model = config.model
    latent, hidden = model.latent_size, list(model.decoder_hidden)
    if model.kind == "hierarchical":  # z = (z1, z2) and the network of p(z1|z2)
        latent, hidden = latent + model.latent_size_2, hidden + list(model.prior_hidden)
    if model.kind == "conv":  # stride-2 layers: channels c_i at a quarter of the previous size (D bounds H x W)
        hidden = hidden + [2 * c * data_size // 4 ** (i + 1) for i, c in enumerate(model.conv_channels)]
    return latent, hidden


def _dense_weights(widths: list[int]) -> int:
    """Weights and biases of an MLP through ``widths``."""
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))


def num_weights(config, data_size: int) -> int:
    """About how many parameters the decoder and encoder hold (exact for the MLPs; a 5x5 kernel for
    each convolution)."""
    model = config.model
    outputs = 2 if model.likelihood == "logistic" else 1  # logits, or means and log-scales
    count = _dense_weights([model.latent_size, *model.decoder_hidden, outputs * data_size])
    count += _dense_weights([data_size, *model.encoder_hidden, 2 * model.latent_size])
    if model.kind == "hierarchical":
        count += 2 * _dense_weights([model.latent_size_2, *model.prior_hidden, 2 * model.latent_size])
    if model.kind == "conv":
        channels = [1, *model.conv_channels]
        count += 2 * sum(25 * a * b for a, b in zip(channels[:-1], channels[1:]))
    return count


def stage_memory(config, data_size: int) -> list[StageMemory]:
    """The estimated peak of every stage the config runs (see the module docstring)."""
    evaluation, ais, curve = config.eval, config.ais, config.curve
    batch = min(evaluation.batch_size, evaluation.num_datapoints)  # B
    latent, hidden = activation_widths(config, data_size)
    row = row_bytes(data_size, latent, hidden, with_gradient=False)
    row_grad = row_bytes(data_size, latent, hidden, with_gradient=True)
    weights = BYTES_PER_VALUE * num_weights(config, data_size)
    chunk = evaluation.chunk_size or max(1, DEFAULT_ROWS_PER_CHUNK // batch)
    iwae = min(evaluation.num_samples, chunk) * batch * row
    sizes = (f"model.latent_size {config.model.latent_size}, widths {config.model.encoder_hidden} / "
             f"{config.model.decoder_hidden}")
    stages = [
        StageMemory("train", TRAIN_WEIGHT_COPIES * weights + config.train.batch_size * row_grad,
                    f"{num_weights(config, data_size):,} weights ({sizes}), train.batch_size "
                    f"{config.train.batch_size}",
                    "lower model.latent_size, model.encoder_hidden / decoder_hidden or train.batch_size"),
        StageMemory("amortized", weights + iwae,
                    f"{min(evaluation.num_samples, chunk)} samples per chunk x {batch} datapoints",
                    "lower eval.chunk_size or eval.batch_size"),
    ]
    refine_samples = max(config.refine.resolved(f).num_samples for f in config.refine.families)
    stages.append(StageMemory("local", weights + max(refine_samples * batch * row_grad, iwae),
                              f"refine.num_samples {refine_samples} x {batch} datapoints",
                              "lower refine.num_samples, eval.chunk_size or eval.batch_size"))
    if ais.enabled:
        state = AIS_STATE_VALUES * BYTES_PER_VALUE * ais.num_chains * batch * (latent + 1)
        chains = min(ais.num_chains, max(1, DEFAULT_ROWS_PER_CHUNK // batch))
        stages.append(StageMemory("ais", weights + state + chains * batch * row_grad,
                                  f"ais.num_chains {ais.num_chains} x {batch} datapoints x latent {latent}",
                                  "lower ais.num_chains or eval.batch_size"))
    if curve.enabled:
        stages.append(StageMemory("curve", weights + curve.num_samples * batch * row_grad,
                                  f"curve.num_samples {curve.num_samples} x {batch} datapoints",
                                  "lower curve.num_samples or eval.batch_size"))
    return stages


def available_bytes(device: torch.device) -> int | None:
    """Free memory of ``device``: ``torch.cuda.mem_get_info`` on a GPU; MemAvailable (/proc/meminfo),
    else free pages (``os.sysconf``), on a CPU; None when the system does not say."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / 2 ** 30:.3g} GiB"


def memory_problems(config, data_size: int, device: torch.device, *, skip: set[str] = frozenset()) -> list[str]:
    """One sentence per stage (but those in ``skip``, already finished) that cannot fit in the free
    memory of ``device``; empty when all fit or the free memory is unknown, and for an external model
    (``model.factory``), whose network sizes the config does not know."""
    free = available_bytes(torch.device(device))
    if free is None or getattr(config.model, "factory", None) is not None:
        return []
    return [f"the {s.stage} stage needs about {_gib(s.num_bytes)} ({s.what}) but {torch.device(device).type} has "
            f"{_gib(free)} free; {s.fix}"
            for s in stage_memory(config, data_size) if s.stage not in skip and s.num_bytes > free]
