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

import numpy as np
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


def compare(model, *, num_datapoints: int = 100, num_samples: int = 1000) -> dict:
    """gapbench's L[q] and IWAE-k next to pythae's -loss (one forward pass, its own noise) and get_nll
    (k = num_samples importance samples) on the first binarised test digits; means over datapoints."""
    from gapbench.adapters.pythae import from_pythae
    from gapbench.measure import bounds_of

    gap_model, encoder = from_pythae(model)
    x = binarize(load_dataset("digits").test[:num_datapoints], mode="static", threshold=0.5, generator=None)
    with torch.no_grad():
        pair = bounds_of(gap_model, encoder(x), x, num_samples=num_samples, chunk_size=None,
                         generator=torch.Generator().manual_seed(0))
        torch.manual_seed(0)
        losses = [float(model({"data": x.reshape(-1, *model.input_dim)}).loss) for _ in range(100)]
        torch.manual_seed(0)
        nll = model.get_nll(x.reshape(-1, *model.input_dim), n_samples=num_samples, batch_size=num_samples)
    n = len(x)
    return {"gapbench L[q]": (float(pair.elbo.value.mean()), float(pair.elbo.stderr.square().sum().sqrt()) / n),
            "pythae -loss (100 passes)": (-float(np.mean(losses)), float(np.std(losses)) / 10),
            f"gapbench IWAE-{num_samples}": (float(pair.iwae.value.mean()), float(pair.iwae.stderr.square().sum().sqrt()) / n),
            f"pythae get_nll({num_samples})": (float(nll), float("nan"))}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["VAE", "IWAE", "VAE_IAF", "VAE_LinNF"])
    parser.add_argument("out", help="folder for pythae's model.save")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--compare", action="store_true", help="print gapbench's bounds next to pythae's own")
    args = parser.parse_args()
    model = train(args.kind, epochs=args.epochs)
    model.save(args.out)
    print(f"saved a {args.kind} to {args.out}")
    if args.compare:
        for name, (mean, stderr) in compare(model).items():
            print(f"{name:28s} {mean:9.3f}" + ("" if np.isnan(stderr) else f" ± {stderr:.3f}"))
