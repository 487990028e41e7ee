"""What a run is made of, built from its config: the dataset and evaluation datapoints, the networks,
the local families, and the random streams of every stage."""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch

from gapbench.data import Dataset, binarize, check_binary, check_levels, check_values, load_dataset
from gapbench.models import ConvDecoder, ConvTrunk, Decoder, DecoderBase, HierarchicalDecoder
from gapbench.posteriors import (DatapointStreams, HierarchicalEncoder, HierarchicalFamily, LocalFamily, make_encoder,
    make_family)
from gapbench.runner.config import ConfigError, ExperimentConfig
from gapbench.runner.external import ExternalModel, build_external, check_external
from gapbench.runner.stage_table import STAGE_OF

__all__ = ["build_networks", "datapoint_streams", "dataset_of", "evaluation_data", "external_networks",
           "local_family", "log_px_candidates", "networks_for", "stage_generator", "stage_seed"]


def stage_seed(seed: int, stage: str, part: str | None = None) -> int:
    """A 63-bit seed per (seed, stage[, part]), from the stage's fixed stream number (``Stage.stream``);
    ``part`` names a piece of a stage whose numbers must not depend on the others (a local family)."""
    entropy = [seed, STAGE_OF[stage].stream] + ([zlib.crc32(part.encode())] if part is not None else [])
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


def stage_generator(seed: int, stage: str, part: str | None = None, *,
                    device: torch.device | str = "cpu") -> torch.Generator:
    """An independent random stream per (seed, stage[, part]), so a resumed stage repeats exactly (training)."""
    return torch.Generator(device=device).manual_seed(stage_seed(seed, stage, part))


def datapoint_streams(seed: int, stage: str, indices: range | list[int], device: torch.device | str = "cpu", *,
                      part: str | None = None) -> DatapointStreams:
    """The evaluation stages' streams: datapoint i of the split draws from its own stream of (seed,
    stage[, part], i), so its numbers do not depend on its batch, its shard or the number of ranks."""
    return DatapointStreams.from_seed(stage_seed(seed, stage, part), list(indices), device=device)


def build_networks(config: ExperimentConfig, data_size: int, *, image_shape: tuple[int, ...] | None = None,
                   num_levels: int = 256) -> tuple[DecoderBase, torch.nn.Module]:
    """Decoder and encoder (of family ``model.posterior``) initialised from the run seed, without
    touching torch's global stream.

    ``model.kind = "mlp"``: MLP decoder and encoder of ``model.decoder_hidden`` / ``encoder_hidden``;
    ``"conv"``: the convolutional decoder and an encoder on a convolutional trunk
    (``model.conv_channels``), which need ``image_shape``, (H, W) or (C, H, W) with product
    ``data_size``. ``num_levels``: the pixel levels of the discretised logistic likelihood.
    ``"hierarchical"``: the two-layer model p(z2) p(z1|z2) p(x|z1) (MLPs) and its encoder q(z1|x) q(z2|z1).
    """
    model = config.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if model.kind == "hierarchical":
            decoder = HierarchicalDecoder(data_size, model.latent_size, model.latent_size_2,
                                          tuple(model.decoder_hidden), tuple(model.prior_hidden), model.activation,
                                          likelihood=model.likelihood, num_levels=num_levels)
            encoder = HierarchicalEncoder(data_size, model.latent_size, model.latent_size_2,
                                          tuple(model.encoder_hidden), tuple(model.prior_hidden), model.activation)
            return decoder, encoder
        if model.kind == "mlp":
            decoder: DecoderBase = Decoder(data_size, model.latent_size, tuple(model.decoder_hidden), model.activation,
                                           likelihood=model.likelihood, num_levels=num_levels)
            trunk = None
        else:
            if image_shape is None or math.prod(image_shape) != data_size:
                raise ConfigError(f"model.kind = \"conv\" needs the images' shape, got {image_shape} for "
                                  f"{data_size} pixels")
            shape = tuple(image_shape) if len(image_shape) == 3 else (1, *image_shape)  # (C, H, W)
            try:
                decoder = ConvDecoder(shape, model.latent_size, tuple(model.conv_channels), model.activation,
                                      likelihood=model.likelihood, num_levels=num_levels)
                trunk = ConvTrunk(shape, tuple(model.conv_channels), model.activation)
            except ValueError as error:
                raise ConfigError(f"model.conv_channels = {model.conv_channels}: {error}") from None
        encoder = make_encoder(model.posterior, data_size, model.latent_size, tuple(model.encoder_hidden),
                               model.activation, num_steps=model.flow_steps, flow_hidden=model.flow_hidden, trunk=trunk)
    return decoder, encoder


def networks_for(config: ExperimentConfig, dataset: Dataset) -> tuple[DecoderBase, torch.nn.Module]:
    """:func:`build_networks` for the images of ``dataset``; with ``model.factory``, the external model
    and encoder, checked on two datapoints (``gapbench.runner.external``)."""
    if config.model.factory is not None:
        external = external_networks(config, evaluation_data(config, dataset)[:2])
        return external.model, external.encoder
    return build_networks(config, dataset.data_size, image_shape=dataset.image_shape,
                          num_levels=dataset.num_levels)


def external_networks(config: ExperimentConfig, x: torch.Tensor, device: torch.device | str = "cpu") -> ExternalModel:
    """The factory's model and encoder on ``device``, checked by a forward pass on the first datapoints of x."""
    model = config.model
    external = build_external(model.factory, factory_path=model.factory_path, checkpoint=model.checkpoint,
                              device=device)
    check_external(external, x[:2].to(device), spec=model.factory)
    return external


def dataset_of(config: ExperimentConfig) -> Dataset:
    """The dataset ``config.data`` names (a built-in one, or the user's array file)."""
    data = config.data
    return load_dataset(data.dataset, data_dir=data.data_dir, download=data.download, bits=data.bits,
                        file=data.file, domain=data.domain, num_levels=data.num_levels)


def local_family(config: ExperimentConfig, name: str) -> LocalFamily:
    """The local family ``name`` with the run's flow sizes (``model.flow_steps``, ``model.flow_hidden``), or
    the hierarchical one with the two-layer model's (``latent_size``, ``latent_size_2``, ``prior_hidden``)."""
    model = config.model
    if name == "hierarchical":
        return HierarchicalFamily(model.latent_size, model.latent_size_2, tuple(model.prior_hidden), model.activation)
    return make_family(name, num_steps=config.model.flow_steps, hidden_size=config.model.flow_hidden)


def log_px_candidates(config: ExperimentConfig) -> tuple[str, ...]:
    """The estimators log p_hat(x) chooses from per datapoint (``gapbench.estimators.log_px``): IWAE under q and
    under every q*, and AIS when the AIS stage runs."""
    return ("iwae_q", *[f"iwae_q_star_{f}" for f in config.refine.families],
            *(("ais",) if config.ais.enabled else ()))


def evaluation_data(config: ExperimentConfig, dataset: Dataset) -> torch.Tensor:
    """The first ``num_datapoints`` of the chosen split, binarised once with a fixed stream (for the
    Bernoulli likelihood; the discretised logistic takes the pixel levels as they are)."""
    split = dataset.split(config.eval.split)
    num_datapoints = config.eval.num_datapoints
    if num_datapoints > split.shape[0]:
        raise ConfigError(
            f"eval.num_datapoints = {num_datapoints}, but the {dataset.name} {config.eval.split} split has only "
            f"{split.shape[0]} datapoints; lower eval.num_datapoints or choose another eval.split"
        )
    what = f"{dataset.name} {config.eval.split} split"
    check_values(split[:num_datapoints], what)  # grey levels in [0, 1], no NaN or infinity
    generator = torch.Generator().manual_seed(config.seed)
    x = binarize(split[:num_datapoints], mode=config.data.binarization, threshold=config.data.threshold,
                 generator=generator)
    if config.model.likelihood == "bernoulli":
        check_binary(x, f"binarised {what}")  # what the Bernoulli likelihood is a density of
    else:
        check_levels(x, dataset.num_levels, what)  # what the discretised logistic is a distribution of
    return x


