"""The KL autoencoder of latent diffusion: shapes, the KL term, windowed decoding, and the method
trained and evaluated end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import write_pet_store
from jaxvol import experiment
from jaxvol import methods
from jaxvol.models import autoencoder as ae_lib


@pytest.fixture(scope="module")
def tiny():
  net = ae_lib.KLAutoencoder(channels=1, latent_channels=4, factor=4, width=4,
                             channel_mults=(1, 1, 2), groups=2)
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 16, 1), minval=-1, maxval=1)
  params = net.init(jax.random.PRNGKey(1), x)
  return net, params, x


def test_shapes_and_posterior(tiny):
  net, params, x = tiny
  recon, mean, logvar = jax.jit(net.apply)(params, x, jax.random.PRNGKey(2))
  assert recon.shape == x.shape and mean.shape == logvar.shape == (2, 4, 4, 4, 4)
  again, _, _ = net.apply(params, x)  # rng None: the mean is decoded, deterministic
  # (eager against jitted: the same sums, fused differently)
  np.testing.assert_allclose(again, net.apply(params, mean, method=ae_lib.KLAutoencoder.decode),
                             atol=1e-5)
  assert ae_lib.latent_shape((64, 32, 16), 4) == (16, 8, 4)
  with pytest.raises(ValueError, match="multiple of the factor"):
    ae_lib.latent_shape((30, 32, 32), 4)
  with pytest.raises(ValueError, match="power of 2"):
    ae_lib.levels_of(3)


def test_kl_matches_its_closed_form_and_a_monte_carlo_estimate():
  mean = jnp.array([0.0, 0.5, -1.2, 2.0])
  logvar = jnp.array([0.0, -1.0, 0.7, -3.0])
  var = np.exp(np.asarray(logvar))
  closed = np.mean(0.5 * (np.asarray(mean) ** 2 + var - 1 - np.asarray(logvar)))
  np.testing.assert_allclose(float(ae_lib.kl_divergence(mean, logvar)), closed, rtol=1e-6)
  assert float(ae_lib.kl_divergence(jnp.zeros(3), jnp.zeros(3))) == 0.0
  # E_q[log q(z) - log p(z)] by sampling.
  z = np.asarray(mean) + np.sqrt(var) * np.random.default_rng(0).standard_normal((400_000, 4))
  log_q = -0.5 * ((z - np.asarray(mean)) ** 2 / var + np.log(2 * np.pi * var))
  log_p = -0.5 * (z ** 2 + np.log(2 * np.pi))
  np.testing.assert_allclose(np.mean(log_q - log_p, axis=0).mean(), closed, rtol=0.02)


def test_windowed_decoding(tiny):
  net, params, x = tiny
  decode = lambda z: net.apply(params, z, method=ae_lib.KLAutoencoder.decode)
  z = jax.random.normal(jax.random.PRNGKey(3), (1, 6, 5, 7, 4))
  # One window covering the latent is the whole-volume decode.
  np.testing.assert_allclose(ae_lib.decode_windows(decode, z, (6, 5, 7), 4), decode(z),
                             rtol=1e-6, atol=1e-6)
  # A decoder that acts voxel by voxel is reproduced exactly by overlapping windows (the weights
  # are a partition of unity).
  pointwise = lambda w: jnp.sum(ae_lib.layers.upsample_nearest(w, 4), -1, keepdims=True)
  np.testing.assert_allclose(ae_lib.decode_windows(pointwise, z, (3, 3, 3), 4), pointwise(z),
                             rtol=1e-5, atol=1e-5)
  # The real decoder in windows stays close to the whole decode away from nothing in particular.
  windowed = ae_lib.decode_windows(decode, z, (4, 4, 4), 4)
  assert windowed.shape == (1, 24, 20, 28, 1) and np.all(np.isfinite(np.asarray(windowed)))


def test_method_loss_and_reconstruction():
  c = experiment.packaged_config("ldm_autoencoder", "smoke")
  method = methods.build(c)
  assert method.spatial_multiple() == (4, 4, 4)
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 16, 1), minval=-1, maxval=1)
  params = method.init(jax.random.PRNGKey(1), {"target": x, "cond": x})
  (loss, aux), grads = jax.value_and_grad(method.loss, has_aux=True)(
      params, {"target": x, "cond": x}, jax.random.PRNGKey(2))
  assert np.isfinite(float(loss)) and float(aux["kl"]) >= 0
  np.testing.assert_allclose(float(loss), float(aux["l1"]) + c.autoencoder.kl_weight *
                             float(aux["kl"]), rtol=1e-6)
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
  out = method.sample(params, x[:1, :14, :15, :16], None)  # padded to the factor, cropped back
  assert out.shape == (1, 14, 15, 16, 1)
  c.data.inputs = ("t1",)
  with pytest.raises(ValueError, match="reconstructs its input"):
    methods.build(c)


@pytest.mark.slow
def test_autoencoder_trains_and_evaluates_its_reconstructions(tmp_path):
  from jaxvol.eval import evaluate  # pylint: disable=g-import-not-at-top
  from jaxvol.train import loop  # pylint: disable=g-import-not-at-top
  store = write_pet_store(tmp_path, (24, 24, 24), ["train", "train", "test"])
  c = experiment.packaged_config("ldm_autoencoder", "pet_denoise,smoke")
  c.data.store, c.data.num_workers, c.mesh.data = store, 0, 1
  c.autoencoder.decode_window = (4, 4, 4)
  result = loop.train(c, str(tmp_path / "run"))
  assert result["step"] == c.train.steps and np.isfinite(result["loss"])
  summary = evaluate.evaluate(c, str(tmp_path / "run"))
  assert set(summary["metrics"]["psnr"]) >= {"model"} and "input" not in summary["metrics"]["psnr"]
  assert np.isfinite(summary["metrics"]["psnr"]["model"])


@pytest.fixture(scope="module")
def mri_store(tmp_path_factory):
  """Two training and one test 'subject' of 24^3 with a smooth T1 and a T2 that depends on it."""
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  from jaxvol.data import store as store_lib  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("ldm")
  rng = np.random.default_rng(0)
  rows = []
  for i, split in enumerate(("train", "train", "test")):
    t1 = ndimage.gaussian_filter(rng.uniform(0, 100, (24, 24, 24)), 2.0).astype(np.float32) + 10
    for name, vol in (("t1", t1), ("t2", 150.0 - t1)):
      nib.save(nib.Nifti1Image(vol, np.eye(4)), root / f"s{i}_{name}.nii.gz")
    rows.append(f"s{i},{split},s{i}_t1.nii.gz,s{i}_t2.nii.gz")
  (root / "list.csv").write_text("subject,split,t1,t2\n" + "\n".join(rows) + "\n")
  store_lib.convert(root / "list.csv", root / "store", {"t1": "mri", "t2": "mri"})
  return root


@pytest.mark.slow
def test_latent_diffusion_two_stages_evaluate_and_predict(mri_store, tmp_path):
  """The autoencoder, then latent diffusion on its frozen copy: trained by the loop, evaluated,
  predicted through the CLI; a mismatched autoencoder is refused by name."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from conftest import CLI_ENV, ROOT  # pylint: disable=g-import-not-at-top
  from jaxvol.eval import evaluate  # pylint: disable=g-import-not-at-top
  from jaxvol.eval import volumes  # pylint: disable=g-import-not-at-top
  from jaxvol.train import loop  # pylint: disable=g-import-not-at-top
  store = str(mri_store / "store")
  ae = experiment.packaged_config("ldm_autoencoder", "mri_t1_t2,smoke")
  ae.data.store, ae.data.num_workers, ae.mesh.data = store, 0, 1
  loop.train(ae, str(tmp_path / "ae"))
  c = experiment.packaged_config("ldm_mri_t1_t2", "smoke")
  c.data.store, c.data.num_workers, c.mesh.data = store, 0, 1
  with pytest.raises(ValueError, match="autoencoder_workdir"):
    loop.train(c, str(tmp_path / "no_ae"))
  c.ldm.autoencoder_workdir = str(tmp_path / "ae")
  result = loop.train(c, str(tmp_path / "ldm"))
  assert result["step"] == c.train.steps and np.isfinite(result["loss"])
  # The checkpoint carries the autoencoder's EMA weights, unchanged by training.
  ae_params, _ = volumes.load_params(ae, str(tmp_path / "ae"))
  ldm_params, _ = volumes.load_params(c, str(tmp_path / "ldm"))
  for part in ("encoder", "decoder"):
    for a, b in zip(jax.tree.leaves(ae_params["params"][part]),
                    jax.tree.leaves(ldm_params["params"][part])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  summary = evaluate.evaluate(c, str(tmp_path / "ldm"))
  assert np.isfinite(summary["metrics"]["psnr"]["model"])
  r = subprocess.run([sys.executable, "-m", "jaxvol", "predict", "--workdir", str(tmp_path / "ldm"),
                      "--input", str(mri_store / "s2_t1.nii.gz"), "--output",
                      str(tmp_path / "pred")], cwd=ROOT, env=CLI_ENV, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  assert nib.load(tmp_path / "pred" / "s2_t1_pred.nii.gz").shape == (24, 24, 24)
  other = experiment.packaged_config("ldm_mri_t1_t2", "smoke")
  other.data.store, other.mesh.data = store, 1
  other.autoencoder.width = 8
  other.ldm.autoencoder_workdir = str(tmp_path / "ae")
  with pytest.raises(ValueError, match="autoencoder.width"):
    loop.build_everything(other, str(tmp_path / "other"))


def test_adversarial_terms_train_each_player_on_its_own_term():
  """With adv_weight > 0: nothing adversarial before adv_start; after it, the discriminator's
  gradient is that of its own least-squares term, and the autoencoder's that of L1 + KL + the
  weighted generator term through a frozen discriminator."""
  c = experiment.packaged_config("ldm_autoencoder", "smoke")
  c.autoencoder.adv_weight, c.autoencoder.adv_start = 0.5, 10
  c.autoencoder.disc_width, c.autoencoder.disc_layers = 4, 2
  method = methods.build(c)
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 16, 1), minval=-1, maxval=1)
  batch = {"target": x, "cond": x}
  params = method.init(jax.random.PRNGKey(1), batch)
  assert set(params["params"]) == {"encoder", "decoder", "discriminator"}
  rng = jax.random.PRNGKey(2)
  grad = lambda step: jax.grad(lambda p: method.loss_at(p, batch, rng, jnp.int32(step))[0])(params)
  before = grad(3)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(before["params"]["discriminator"]))
  after = grad(10)
  disc = method._discriminator()  # pylint: disable=protected-access
  ae = {"params": {k: params["params"][k] for k in ("encoder", "decoder")}}
  recon = method.net.apply(ae, x, rng)[0]

  def d_term(d):
    return ae_lib.least_squares_losses(disc.apply({"params": d}, x),
                                       disc.apply({"params": d}, recon),
                                       disc.apply({"params": d}, recon))[0]
  want_d = jax.grad(d_term)(params["params"]["discriminator"])
  for a, b in zip(jax.tree.leaves(after["params"]["discriminator"]), jax.tree.leaves(want_d)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)

  def g_term(p):
    r, mean, logvar = method.net.apply({"params": p}, x, rng)
    g = jnp.mean(jnp.square(disc.apply({"params": params["params"]["discriminator"]}, r) - 1.0))
    return (jnp.mean(jnp.abs(r - x)) + c.autoencoder.kl_weight * ae_lib.kl_divergence(mean, logvar)
            + 0.5 * g)
  want_g = jax.grad(g_term)(ae["params"])
  for a, b in zip(jax.tree.leaves({k: after["params"][k] for k in ("encoder", "decoder")}),
                  jax.tree.leaves(want_g)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  out = method.sample(params, x[:1], None)  # the discriminator plays no part in reconstructing
  assert out.shape == (1, 16, 16, 16, 1)
