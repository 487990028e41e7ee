"""Train a small pythae model on the binarised digits and save it, for ``experiments/pythae_example.toml``.

    python experiments/pythae_digits.py VAE runs/pythae_vae --epochs 30      # also IWAE, VAE_IAF, VAE_LinNF
    gapbench run experiments/pythae_example.toml --set model.checkpoint='"runs/pythae_vae"'

The data are gapbench's digits train split, binarised once at 0.5 (what ``data.binarization =
"static"`` gives), and the model uses pythae's default MLP networks with ``reconstruction_loss =
"bce"``, so gapbench measures it with the Bernoulli likelihood it was trained with. The loop is plain
Adam on ``model(...).loss`` (pythae's own loss), in place of pythae's trainer, which writes
timestamped folders and logs we do not need here.
"""

from __future__ import annotations

import argparse

import torch

from gapbench.data import binarize, load_dataset

LATENT_SIZE = 8


def make_pythae_model(kind: str, *, latent_size: int = LATENT_SIZE, reconstruction_loss: str = "bce",
                      input_dim: tuple[int, ...] = (1, 8, 8)):
    """An untrained pythae model of ``kind`` (VAE, IWAE, VAE_IAF, VAE_LinNF) with default networks."""
    from pythae import models

    configs = {"VAE": (models.VAE, models.VAEConfig, {}),
               "IWAE": (models.IWAE, models.IWAEConfig, {"number_samples": 5}),
               "VAE_IAF": (models.VAE_IAF, models.VAE_IAF_Config, {"n_made_blocks": 2, "hidden_size": 32}),
               "VAE_LinNF": (models.VAE_LinNF, models.VAE_LinNF_Config, {"flows": ["Planar", "Radial", "Planar"]})}
    model_class, config_class, extra = configs[kind]
    config = config_class(input_dim=input_dim, latent_dim=latent_size, reconstruction_loss=reconstruction_loss,
                          **extra)
    return model_class(config)


def digits_binarised() -> torch.Tensor:
    """The digits train split (1197, 1, 8, 8), binarised at 0.5."""
    x = load_dataset("digits").train
    return binarize(x, mode="static", threshold=0.5, generator=None).reshape(-1, 1, 8, 8)


def train(kind: str, *, epochs: int = 30, seed: int = 0, reconstruction_loss: str = "bce",
          data: torch.Tensor | None = None):
    """A pythae model trained with Adam (lr 1e-3, batches of 100) on ``data`` (default: binarised digits)."""
    torch.manual_seed(seed)  # pythae samples from torch's global stream
    data = digits_binarised() if data is None else data
    model = make_pythae_model(kind, reconstruction_loss=reconstruction_loss, input_dim=tuple(data.shape[1:]))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(data), generator=generator).split(100):
            loss = model({"data": data[batch]}).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["VAE", "IWAE", "VAE_IAF", "VAE_LinNF"])
    parser.add_argument("out", help="folder for pythae's model.save")
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    train(args.kind, epochs=args.epochs).save(args.out)
    print(f"saved a {args.kind} to {args.out}")
