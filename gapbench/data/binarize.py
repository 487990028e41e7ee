"""Binarisation of grey-level images for Bernoulli likelihoods."""

import torch

BINARIZE_MODES: tuple[str, ...] = ("static", "dynamic", "none")


def binarize(
    x: torch.Tensor,
    *,
    mode: str,
    threshold: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Turn grey levels in [0, 1] into {0, 1} pixels.

    - ``"static"``: ``b = 1[x > threshold]``; the same every call (``generator`` is unused).
    - ``"dynamic"``: ``b ~ Bernoulli(x)`` elementwise, so ``E[b] = x``; a fresh draw every call
      (the training loop calls it once per epoch). Dynamic binarisation of MNIST follows
      Salakhutdinov & Murray (2008), "On the Quantitative Analysis of Deep Belief Networks".
    - ``"none"``: ``x`` itself, for likelihoods of grey levels (the discretised logistic).

    Parameters
    ----------
    x : torch.Tensor
        Grey levels in [0, 1], any shape, floating point, e.g. ``(B, D)``.
    mode : str
        ``"static"``, ``"dynamic"`` or ``"none"``.
    threshold : float
        Cut-off for ``"static"``, strictly between 0 and 1.
    generator : torch.Generator, optional
        Source of randomness for ``"dynamic"``; on the device of ``x``.

    Returns
    -------
    torch.Tensor
        Same shape and dtype as ``x``, values in {0, 1} (``"none"``: ``x`` itself).

    Raises
    ------
    ValueError
        If ``mode`` is unknown or ``threshold`` is not in (0, 1).
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be strictly between 0 and 1, got {threshold!r}")
    if mode == "static":
        return (x > threshold).to(x.dtype)
    if mode == "dynamic":
        return torch.bernoulli(x, generator=generator)
    if mode == "none":
        return x
    raise ValueError(f"unknown binarisation mode {mode!r}; choose one of {BINARIZE_MODES}")
