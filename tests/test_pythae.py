"""The pythae adapter against pythae's own numbers: tiny pythae models trained on the binarised digits.

- L[q] on the same z: pythae's forward pass (its loss, from torch's global stream) and gapbench's
  log p(x|z) + log p(z) - log q(z) on the same base noise agree to float error (VAE: the
  reconstruction term; pythae's VAE loss takes the KL in closed form, checked against gapbench's
  log q - log p by Monte Carlo).
- IWAE-1000 against pythae's ``get_nll`` (importance sampling with the encoder, 1000 samples): within
  Monte Carlo error.
- A pythae model folder through `gapbench run` (the example's path).
Skipped without pythae (``pip install 'gapbench[pythae]'``).
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pythae")

from gapbench.adapters.pythae import from_pythae, gaussian_constant, load  # noqa: E402
from gapbench.cli import main  # noqa: E402
from gapbench.measure import bounds_of  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import pythae_digits  # noqa: E402

sys.path.remove(str(ROOT / "experiments"))

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per module
EPOCHS = 5


@pytest.fixture(scope="module")
def trained():
    """kind -> a pythae model trained for a few epochs (BCE on binarised digits; VAE_mse on grey levels)."""
    from gapbench.data import load_dataset
    grey = load_dataset("digits").train.reshape(-1, 1, 8, 8)
    models = {kind: pythae_digits.train(kind, epochs=EPOCHS) for kind in ("VAE", "IWAE", "VAE_IAF", "VAE_LinNF")}
    models["VAE_mse"] = pythae_digits.train("VAE", epochs=EPOCHS, reconstruction_loss="mse", data=grey)
    return models


def data_for(kind: str, n: int) -> torch.Tensor:
    from gapbench.data import load_dataset
    x = load_dataset("digits").test[:n]
    return x if kind == "VAE_mse" else (x > 0.5).float()  # (n, 64)


@pytest.mark.parametrize("kind", ["VAE", "VAE_mse", "IWAE", "VAE_IAF", "VAE_LinNF"])
def test_same_noise_gives_pythaes_loss(trained, kind):
    pythae_model = trained[kind]
    model, encoder = from_pythae(pythae_model)
    x = data_for(kind, 40)  # (B, D)
    if kind == "IWAE":
        return _iwae_same_noise(pythae_model, model, encoder, x)
    x_image = x.reshape(-1, 1, 8, 8)
    with torch.no_grad():
        torch.manual_seed(1)
        out = pythae_model({"data": x_image})  # draws eps = randn_like(std) first, from the global stream
        mu = pythae_model.encoder(x_image).embedding
        torch.manual_seed(1)
        eps = torch.randn_like(mu)[None]  # (1, B, Z): the same draw
        q = encoder(x)
        if kind in ("VAE", "VAE_mse"):
            z = q.mean + torch.exp(0.5 * q.log_var) * eps  # (1, B, Z)
            log_likelihood = model.log_likelihood(x, z)  # (1, B)
            constant = gaussian_constant(64) if kind == "VAE_mse" else 0.0
            assert torch.allclose(out.z, z[0], atol=1e-6)
            assert torch.allclose(out.recon_loss, -(log_likelihood.mean() + constant), rtol=1e-5, atol=1e-4)
        else:
            z, log_q = q.from_noise(eps)  # (1, B, Z), (1, B)
            assert torch.allclose(out.z, z[0], atol=1e-5)
            elbo = model.log_likelihood(x, z) + model.log_prior(z) - log_q  # (1, B)
            assert torch.allclose(out.loss, -elbo.mean(), rtol=1e-5, atol=1e-4)


def _iwae_same_noise(pythae_model, model, encoder, x):
    """IWAE's forward draws (B, S, Z) noise (S = number_samples); its recon_loss is the mean over B and S
    of the BCE (its loss is a gradient surrogate, not a bound: not compared)."""
    x_image = x.reshape(-1, 1, 8, 8)
    with torch.no_grad():
        torch.manual_seed(2)
        out = pythae_model({"data": x_image})
        q = encoder(x)
        torch.manual_seed(2)
        s = pythae_model.n_samples
        eps = torch.randn(x.shape[0], s, q.mean.shape[-1])  # (B, S, Z), as randn_like on the repeated std
        z = (q.mean[:, None] + torch.exp(0.5 * q.log_var)[:, None] * eps).transpose(0, 1)  # (S, B, Z)
        assert torch.allclose(out.recon_loss, -model.log_likelihood(x, z).mean(), rtol=1e-5, atol=1e-4)


def test_closed_form_kl_of_the_vae_loss(trained):
    """pythae's VAE loss = reconstruction + KL in closed form; gapbench's log q(z) - log p(z) averages to it."""
    model, encoder = from_pythae(trained["VAE"])
    x = data_for("VAE", 10)
    with torch.no_grad():
        q = encoder(x)
        z, log_q = q.rsample_and_log_prob(20000, generator=torch.Generator().manual_seed(0))  # (K, B, Z), (K, B)
        log_ratio = log_q - model.log_prior(z)  # (K, B)
    kl = -0.5 * (1 + q.log_var - q.mean.square() - q.log_var.exp()).sum(-1)  # pythae's KLD line, (B,)
    stderr = log_ratio.std(0) / math.sqrt(log_ratio.shape[0])
    assert ((log_ratio.mean(0) - kl).abs() < 4 * stderr + 1e-4).all()


@pytest.mark.parametrize("kind", ["VAE", "IWAE", "VAE_IAF"])
def test_iwae_agrees_with_pythaes_get_nll(trained, kind):
    """pythae's get_nll (one datapoint at a time, n_samples importance samples from q) against gapbench's
    IWAE-1000. n_samples = batch_size = 1000: get_nll uses batch_size samples whenever n_samples <= batch_size
    (pythae 0.1.2), so that pair is the one where both mean 1000 samples. Tolerance: 4 combined stderrs."""
    pythae_model = trained[kind]
    model, encoder = from_pythae(pythae_model)
    x = data_for(kind, 20)
    with torch.no_grad():
        pair = bounds_of(model, encoder(x), x, num_samples=1000, chunk_size=None,
                         generator=torch.Generator().manual_seed(0))
        torch.manual_seed(0)
        theirs = pythae_model.get_nll(x.reshape(-1, 1, 8, 8), n_samples=1000, batch_size=1000)
    ours = float(pair.iwae.value.mean())
    stderr = float(pair.iwae.stderr.square().sum().sqrt()) / len(x)  # of our mean; theirs has about the same
    assert abs(ours - theirs) < 4 * math.sqrt(2) * stderr + 1e-4, (ours, theirs, stderr)
    assert float(pair.elbo.value.mean()) < ours  # L[q] <= IWAE


def test_a_pythae_folder_through_gapbench_run(trained, tmp_path, capsys):
    folder = tmp_path / "vae_iaf"
    trained["VAE_IAF"].save(str(folder))
    out = tmp_path / "run"
    args = ["run", str(ROOT / "experiments" / "pythae_example.toml"), "--out", str(out),
            "--set", f'model.checkpoint="{folder}"', "--set", "eval.num_datapoints=10", "--set", "eval.num_samples=200",
            "--set", "refine.max_steps=100", "--set", "ais.num_steps=20", "--set", "ais.num_chains=4", "--quiet"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["training"]["external"]["versions"]["pythae"]
    assert summary["settings"]["model"]["checkpoint_sha256"] == summary["training"]["external"]["checkpoint_sha256"]
    frame = np.genfromtxt(out / "datapoints.csv", delimiter=",", names=True)
    assert (frame["elbo_q"] <= frame["iwae_q"] + 1e-6).all()
    (folder / "encoder.pkl").write_bytes(b"not loaded")
    assert main([*args, "--out", str(tmp_path / "other")]) == 2
    assert "encoder.pkl" in capsys.readouterr().err


def test_load_refuses_what_is_not_a_pythae_folder(tmp_path):
    from gapbench.adapters.pythae import PythaeAdapterError
    with pytest.raises(PythaeAdapterError, match="not a pythae model folder"):
        load(tmp_path)


@pytest.mark.parametrize("kind", ["VAE", "VAE_mse"])
def test_likelihood_against_torch_distributions(trained, kind):
    """log p(x|z) on its own (AIS tempers it alone): Bernoulli(probs = decoder output) or Normal(output, 1)."""
    from torch.distributions import Bernoulli, Independent, Normal

    pythae_model = trained[kind]
    model, _ = from_pythae(pythae_model)
    x = data_for(kind, 6)
    z = torch.randn(4, 6, pythae_model.model_config.latent_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        r = pythae_model.decoder(z.reshape(24, -1))["reconstruction"].reshape(4, 6, 64)  # (K, B, D)
        base = Bernoulli(probs=r.double()) if kind == "VAE" else Normal(r.double(), 1.0)
        expected = Independent(base, 1).log_prob(x.double())  # (K, B)
        assert torch.allclose(model.log_likelihood(x, z).double(), expected, rtol=1e-5, atol=1e-3)
        assert torch.allclose(model.log_prior(z).double(), Independent(Normal(0.0, torch.ones(8)), 1).log_prob(z).double(),
                              atol=1e-5)
