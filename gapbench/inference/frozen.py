"""Holding a model still while a posterior is fitted to it: frozen parameters, the encoder's q without a graph."""

from __future__ import annotations

from typing import Any, Callable

import torch

from gapbench.posteriors import as_posterior


def amortized_posterior(encoder: Callable, x: torch.Tensor):
    """The encoder's posterior for x, without an autograd graph."""
    with torch.no_grad():
        return as_posterior(encoder(x))


class frozen:
    """Context manager: stop a torch model's parameters from collecting gradients."""

    def __init__(self, model: Any):
        self.params = [p for p in getattr(model, "parameters", lambda: [])() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)
