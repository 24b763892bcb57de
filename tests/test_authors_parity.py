"""jaxvol against the authors' own code, output for output (rtol 1e-4, float32).

Two seed papers publish their code; the fixtures under tests/fixtures/authors/ hold what their
PyTorch modules, samplers and evaluation functions returned on small fixed inputs with fixed
weights (README.md there: repository @ commit, modules, arguments, and the command that wrote each
file). The weights enter jaxvol through the converters a user runs on the authors' released
checkpoints (jaxvol.models.convert_sparse, jaxvol.models.convert_prdit). No torch is needed here.

Sections:
  1. Sparse voxel-space diffusion + STM (mirthAI/sparse-3d-diffusion): the U-Net + STM forward in
     the authors' layout, their sampler, the paper-size parameter count.
  2. PRDiT (Fredy-Zhang/PRDiT): the local denoiser, a DiT block, the full stage-2 forward, the
     Euler and predictor-corrector samplers, and stage 1's sensitivity to a window's mean level.
     2b. PRDiT-FM (Fredy-Zhang/PRDiT-FM): the flow-matching loss, the t = 0.5 reconstruction and
     the Euler and Heun samplers on the velocity-head network.
  3. PRDiT's generation metrics: FID, MMD, MS-SSIM and the MedicalNet input convention.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT
from conftest import load_module
from jaxvol.diffusion import flow
from jaxvol.diffusion import gaussian
from jaxvol.diffusion import sparse
from jaxvol.diffusion import trig
from jaxvol.eval import generation
from jaxvol.models import convert_prdit
from jaxvol.models import convert_sparse
from jaxvol.models import medicalnet
from jaxvol.models import prdit
from jaxvol.models import stm
from jaxvol.models import unet3d

FIXTURES = ROOT / "tests" / "fixtures" / "authors"


# ================================================================================================
# 1. Sparse voxel-space diffusion + STM
#
# Sparse voxel-space diffusion in the authors' layout against their PyTorch code, output for
# output.
#
# Fixture: tests/fixtures/authors/sparse_unet.npz, written by tests/fixtures/authors/make_sparse.py
# from mirthAI/sparse-3d-diffusion (README.md): a tiny `SuperResModel_noatt` (UNetModel +
# HybridCondEncoder; widths 8/16/16, one res block, 2-head attention at the 1/4 level, 4-group
# GroupNorm), its weights as their state dict, its output on fixed inputs and one run of their
# sampler (`ddim_sample_loop`, f_steps 5) from a fixed x_T. Their volumes are (B, C, D, H, W), ours
# (B, D, H, W, C): only the channel axis moves.
# ================================================================================================

FIXTURE = FIXTURES / "sparse_unet.npz"
# Their SuperResModel_noatt at the paper's size (configs/ps128_*.yml: width 64, mults
# (1, 1, 2, 2, 4), 2 res blocks, attention at 1/8, 4 heads, STM encoder), counted in their code.
AUTHORS_PAPER_PARAMS = 43_261_825
JAXVOL_PAPER_PARAMS = 54_454_657  # jaxvol's own layout, same config fields


def _to_ours(x):
  return jnp.asarray(np.moveaxis(np.asarray(x, np.float32), 1, -1))


@pytest.fixture(scope="module")
def sparse_fx():
  f = np.load(FIXTURE)
  state_dict = {k[2:]: f[k].astype(np.float32) * f["s/" + k[2:]]
                for k in f.files if k.startswith("q/")}
  fields = convert_sparse.infer_model_fields(state_dict, num_heads=2, groups=int(f["groups"]))
  net = convert_sparse.net_from_fields(fields)
  variables = convert_sparse.convert_torch_state_dict(state_dict, net)
  cond = _to_ours(f["cond_q"].astype(np.float32) / 64)
  x_T = _to_ours(f["noise_q"].astype(np.float32) / 32)
  return dict(f=f, net=net, fields=fields, variables=variables, cond=cond, x_T=x_T,
              state_dict=state_dict)


def _close_sparse(got, ref):
  ref = np.asarray(ref)
  err = np.abs(np.asarray(got) - ref)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
  return float(err.max())


def test_converter_reads_the_architecture(sparse_fx):
  fields, net = sparse_fx["fields"], sparse_fx["net"]
  assert fields["channel_mults"] == (1, 2, 2) and fields["num_res_blocks"] == 1
  assert fields["attention_levels"] == (2,) and fields["time_embed_dim"] == 32
  assert net.layout == "authors" and net.stm and fields["in_channels"] == 2
  count = sum(np.size(x) for x in jax.tree.leaves(sparse_fx["variables"]))
  assert count == int(sparse_fx["f"]["num_params"])
  convert_sparse._shape_check(sparse_fx["variables"], net, 2, 1)  # pylint: disable=protected-access
  bad = dict(sparse_fx["state_dict"])
  bad["stray.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match="stray.weight"):
    convert_sparse.convert_torch_state_dict(bad, net)
  del bad["stray.weight"], bad["out.2.weight"]
  with pytest.raises(ValueError, match="out.2.weight"):
    convert_sparse.convert_torch_state_dict(bad, net)


def test_forward_matches_their_unet(sparse_fx):
  f, net, v = sparse_fx["f"], sparse_fx["net"], sparse_fx["variables"]
  x_t = jnp.concatenate([sparse_fx["x_T"], sparse_fx["cond"]])
  low = jnp.concatenate([sparse_fx["cond"], sparse_fx["x_T"]])
  encoder = stm.StructureEncoder(net.stm_dim, layout="authors")
  _close_sparse(encoder.apply({"params": v["params"]["stm_encoder"]}, low), f["stm_code"])
  out = jax.jit(lambda v, x, y, t: net.apply(v, jnp.concatenate([x, y], -1), t, structure=y))(
      v, x_t, low, jnp.asarray(f["forward_t"]))
  err = _close_sparse(out[:, ::3, ::3, ::3], _to_ours(f["forward_out_sub3"]))
  np.testing.assert_allclose(np.mean(out, axis=(1, 2, 3, 4)), f["forward_out_mean"], rtol=1e-4,
                             atol=1e-6)
  assert err < 1e-4


@pytest.mark.slow
def test_sampler_matches_theirs(sparse_fx):
  f, net, v, cond = sparse_fx["f"], sparse_fx["net"], sparse_fx["variables"], sparse_fx["cond"]
  d = gaussian.GaussianDiffusion(1000, 1e-4, 0.02, "x0")
  ts = sparse.sparse_timesteps(1000, int(f["f_steps"]), "arange")
  assert ts.tolist() == [0, 199, 399, 599, 799, 999]
  calls = []

  def denoise(x, t):
    calls.append(1)  # traced once per evaluation site
    return net.apply(v, jnp.concatenate([x, cond], -1), t, structure=cond)

  out = jax.jit(lambda x: sparse.authors_sample(d, denoise, x, ts, clip_x0=1.0))(sparse_fx["x_T"])
  assert sparse.nfe(ts, sampler="authors") == 11
  assert len(calls) == 2 + 1 + 2  # scanned corrected move (2), move to 0 (1), 0 -> -1 (2)
  _close_sparse(out[:, ::2, ::2, ::2], _to_ours(f["sample_out_sub2"]))
  np.testing.assert_allclose(np.mean(out), f["sample_out_mean"], rtol=1e-4, atol=1e-6)


def test_authors_mode_starts_as_their_pytorch_network():
  """`:authors` initialises as PyTorch initialises their layers (sparse_init.npz: a fresh tiny
  network of theirs): the same layers zero, every other weight and bias uniform in
  +-1/sqrt(fan_in) with their spread, norm scales 1 and offsets 0."""
  from jaxvol import config as config_lib  # pylint: disable=g-import-not-at-top
  from jaxvol import methods  # pylint: disable=g-import-not-at-top
  fx = np.load(FIXTURES / "sparse_init.npz")
  names = [str(n) for n in fx["names"]]
  shapes = make_prdit.table_shapes(fx["shapes"])
  c = config_lib.sparse_config("ct_denoise", "authors,smoke")
  assert c.model.init == "torch"
  c.model.base_width, c.model.channel_mults, c.model.num_res_blocks = 8, (1, 2, 2), 1
  c.model.attention_levels, c.model.num_heads, c.model.groups = (2,), 2, 4
  c.model.time_embed_dim, c.model.stm_dim = 32, 128
  method = methods.build(c)
  side = 48  # the STM encoder's smallest input
  batch = {"cond": jnp.zeros((1, side, side, side, 1)), "target": jnp.zeros((1, side, side, side, 1))}
  params = jax.jit(method.init)(jax.random.PRNGKey(0), batch)
  # Which of our leaves is which of their entries: convert a state dict of constant indices.
  index = {n: np.full(s, i + 1, np.float32) for i, (n, s) in enumerate(zip(names, shapes))
           if not n.endswith("num_batches_tracked")}
  tagged = convert_sparse.convert_torch_state_dict(index, method.net)
  pairs = [(names[int(np.asarray(t).flat[0]) - 1], np.asarray(p)) for t, p in
           zip(jax.tree.leaves(tagged), jax.tree.leaves(params))]
  assert len(pairs) == len(index)
  for name, ours in pairs:
    i = names.index(name)
    zero, max_abs, std = bool(fx["zero"][i]), float(fx["max_abs"][i]), float(fx["std"][i])
    assert (not np.any(ours)) == zero, name
    if zero:
      continue
    if name.endswith(".weight") and len(shapes[i]) == 1:  # GroupNorm scale
      np.testing.assert_array_equal(ours, 1.0, err_msg=name)
      continue
    kernel_shape = shapes[names.index(name.rsplit(".", 1)[0] + ".weight")]
    bound = 1.0 / np.sqrt(np.prod(kernel_shape[1:]))
    assert max_abs <= bound * (1 + 1e-6) and np.abs(ours).max() <= bound * (1 + 1e-6), name
    if ours.size >= 500:
      assert abs(ours.std() / std - 1) < 0.1, (name, ours.std(), std)


def test_training_draws_from_their_training_level_set():
  """The authors' rule trains on the set their training samples (float32 arange) and samples
  over their sampler's (float64): equal except the top level for some f_steps."""
  fx = np.load(FIXTURES / "sparse_levels.npz")
  differ = []
  for f, row in zip(fx["f_steps"], fx["levels"]):
    theirs = row[row >= 0]
    try:
      ours = sparse.training_timesteps(1000, int(f), "arange")
    except ValueError:  # no f + 1 distinct levels under the rule
      continue
    np.testing.assert_array_equal(ours, theirs, err_msg=f"f_steps={f}")
    if not np.array_equal(ours, sparse.sparse_timesteps(1000, int(f), "arange")):
      differ.append(int(f))
  assert differ == [19, 38]
  from jaxvol import config as config_lib  # pylint: disable=g-import-not-at-top
  from jaxvol import methods  # pylint: disable=g-import-not-at-top
  c = config_lib.sparse_config("ct_denoise", "authors,smoke")
  c.sparse.f_steps = 19
  m = methods.build(c)
  assert m.train_timesteps[-1] == 999 and m.timesteps[-1] == 998


def test_training_loss_and_forward_noising_match_theirs(sparse_fx):
  """Their training_losses (x0 prediction scored in velocity space) on the same network: x_t the
  network saw and the loss (the per-example losses of a batch of two, averaged)."""
  fx = np.load(FIXTURES / "sparse_loss.npz")
  x0, low, eps = (_to_ours(v) for v in make_losses.sparse_inputs())
  net, v = sparse_fx["net"], sparse_fx["variables"]
  d = gaussian.GaussianDiffusion(1000, 1e-4, 0.02, "x0")
  t = jnp.asarray(fx["t"])
  np.testing.assert_array_equal(fx["model_t"], fx["t"])  # their rescale_timesteps is off
  x_t = d.q_sample(x0, t, eps)
  _close_sparse(x_t[:, ::3, ::3, ::3], _to_ours(fx["x_t_sub3"]))
  np.testing.assert_allclose(np.mean(x_t, axis=(1, 2, 3, 4)), fx["x_t_mean"], rtol=1e-5,
                             atol=1e-7)
  out = jax.jit(lambda v, x, y, t: net.apply(v, jnp.concatenate([x, y], -1), t, structure=y))(
      v, x_t, low, t)
  np.testing.assert_allclose(float(sparse.velocity_loss(d, out, x0, eps, t)),
                             float(np.mean(fx["loss"])), rtol=1e-4)


@pytest.mark.slow
def test_paper_structure_forward_matches_theirs():
  """Their U-Net + STM with configs/ps128_ct.yml's structure (width 64, multipliers
  (1, 1, 2, 2, 4), 2 res blocks, attention at 1/8 with 4 heads, 32-group GroupNorm) on 48^3."""
  fx = np.load(FIXTURES / "sparse_paper_unet.npz")
  assert int(fx["num_params"]) == AUTHORS_PAPER_PARAMS
  shape = (2, 1) + (make_paper_sizes.SPARSE_SIDE,) * 3
  state_dict = {str(n): make_paper_sizes.paper_weight(str(n), s) for n, s in
                zip(fx["names"], make_prdit.table_shapes(fx["shapes"]))}
  fields = convert_sparse.infer_model_fields(state_dict, num_heads=4, groups=32)
  assert fields["channel_mults"] == (1, 1, 2, 2, 4) and fields["num_res_blocks"] == 2
  assert fields["base_width"] == 64 and fields["groups"] == 32
  net = convert_sparse.net_from_fields(fields)
  variables = convert_sparse.convert_torch_state_dict(state_dict, net)
  x_t = _to_ours(make_paper_sizes.inputs("paper/sparse/x_t", shape))
  low = _to_ours(make_paper_sizes.inputs("paper/sparse/x_low", shape))
  out = jax.jit(lambda v, x, y, t: net.apply(v, jnp.concatenate([x, y], -1), t, structure=y))(
      variables, x_t, low, jnp.asarray(fx["t"]))
  _close_sparse(out[:, ::3, ::3, ::3], _to_ours(fx["out_sub3"]))
  np.testing.assert_allclose(np.mean(out, axis=(1, 2, 3, 4)), fx["out_mean"], rtol=1e-4,
                             atol=1e-6)


@pytest.mark.parametrize("layout,count", [("authors", AUTHORS_PAPER_PARAMS),
                                          ("jaxvol", JAXVOL_PAPER_PARAMS)])
def test_paper_size_parameter_count(layout, count):
  net = unet3d.UNet3D(out_channels=1, base_width=64, channel_mults=(1, 1, 2, 2, 4),
                      num_res_blocks=2, attention_levels=(3,), num_heads=4, groups=32,
                      dropout=0.1, time_embed_dim=256, stm=True, stm_dim=128, layout=layout)
  x = jnp.zeros((1, 128, 128, 128, 2))
  shapes = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), x, jnp.zeros((1,), jnp.int32),
                                           structure=x[..., :1]))
  assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)) == count
  if layout == "authors":
    assert net.decoder_widths()[:9] == [256, 128, 128, 128, 128, 128, 128, 64, 64]


def test_authors_level_sets():
  # Their sampler's numpy float64 arange, truncated (values printed from their code).
  assert sparse.sparse_timesteps(1000, 3, "arange").tolist() == [0, 332, 665, 999]
  assert sparse.sparse_timesteps(1000, 3).tolist() == [0, 333, 666, 999]
  assert sparse.sparse_timesteps(1000, 19, "arange")[-1] == 998
  assert sparse.sparse_timesteps(1000, 1, "arange").tolist() == [0, 999]
  for f in (2, 4, 5, 8, 10, 20, 25, 50):  # divisors of T: both rules agree
    assert (sparse.sparse_timesteps(1000, f, "arange") == sparse.sparse_timesteps(1000, f)).all()
  assert sparse.nfe([0, 999], sampler="authors") == 3
  assert sparse.nfe(sparse.sparse_timesteps(1000, 10, "arange"), sampler="authors") == 21
  with pytest.raises(ValueError, match="rule"):
    sparse.sparse_timesteps(1000, 5, "cosine")


def test_command_line_converts_a_state_dict(sparse_fx, tmp_path, capsys):
  from flax import serialization  # pylint: disable=import-outside-toplevel
  src = tmp_path / "model000010.npz"
  np.savez(src, **{f"module.{k}": v for k, v in sparse_fx["state_dict"].items()})  # DDP prefixes
  out = tmp_path / "sparse.msgpack"
  assert convert_sparse.main([str(src), str(out), "--num_heads", "2", "--groups", "4"]) == 0
  assert "layout='authors'" in capsys.readouterr().out
  restored = serialization.msgpack_restore(out.read_bytes())
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(sparse_fx["variables"])):
    np.testing.assert_array_equal(a, b)
  assert convert_sparse.main([str(src), str(tmp_path / "w.npz"), "--num_heads", "2"]) == 0
  assert "params/stm_encoder/coronal0/kernel" in np.load(tmp_path / "w.npz").files
  assert convert_sparse.main([str(tmp_path / "missing.npz"), str(tmp_path / "x.npz")]) == 1
  with pytest.raises(SystemExit):
    convert_sparse.main([str(src), str(tmp_path / "w.txt")])


# ================================================================================================
# 2. PRDiT
#
# PRDiT against the authors' code (Fredy-Zhang/PRDiT): module outputs and samplers, to rtol 1e-4.
#
# The fixtures (tests/fixtures/authors/prdit_*.npz, written by make_prdit.py; provenance in
# README.md) hold the outputs of the authors' PyTorch modules on fixed inputs. The weights go
# through jaxvol.models.convert_prdit by their PyTorch names; most are recomputed from name and shape
# (make_prdit.synthetic_weight, too many to store in the paper layout). Their volumes are
# (B, C, D, H, W) and ours (B, D, H, W, C): the harness transposes, and their (B, 2C, ...) output is
# compared with our (eps, x0) pair, eps first. Token order and output blocks agree without any
# permutation (jaxvol.models.prdit docstring); their channel-major windows are handled by the
# converter (the two-channel fixture checks it).
# ================================================================================================

make_prdit = load_module(FIXTURES / "make_prdit.py", "make_prdit_weights")
make_losses = load_module(FIXTURES / "make_losses.py", "make_losses_inputs")
make_paper_sizes = load_module(FIXTURES / "make_paper_sizes.py", "make_paper_sizes_weights")
RTOL = 1e-4


def _fixture(name):
  with np.load(FIXTURES / f"prdit_{name}.npz") as data:
    return {k: data[k] for k in data.files}


@functools.lru_cache(maxsize=None)
def _weight(name, shape):
  return make_prdit.synthetic_weight(name, shape)


def _state_dict(fx):
  shapes = make_prdit.table_shapes(fx["shapes"])
  return {str(n): _weight(str(n), s) for n, s in zip(fx["names"], shapes)}


def _ours(x):
  return jnp.asarray(np.moveaxis(x, 1, -1))


def _theirs(eps, x0):
  return np.moveaxis(np.concatenate([np.asarray(eps), np.asarray(x0)], -1), -1, 1)


def _close(got, want, what):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  atol = 1e-5 * np.abs(want).max()
  err = np.abs(got - want)
  print(f"{what}: max abs err {err.max():.3g} = {err.max() / np.abs(want).max():.3g} x max |ref| "
        f"({np.abs(want).max():.3g}); max rel err where |ref| > 0.1: "
        f"{(err / np.abs(want))[np.abs(want) > 0.1].max():.3g}")
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=atol, err_msg=what)


def _model(sd, channels=1, **overrides):
  fields = convert_prdit.infer_fields(sd, channels)
  fields["heads"] = fields["heads"] or 2
  fields.update(attention="xla", **overrides)
  return prdit.PRDiT(**fields)


@pytest.fixture(scope="module")
def stage2():
  """Their stage-2 model (paper-layout stage 1 + width-24, depth-2 DiT), converted, jitted."""
  fx = _fixture("stage2")
  sd = _state_dict(fx)
  model = _model(sd)
  params = convert_prdit.convert_state_dict(sd)
  return fx, model, params, jax.jit(model.apply)


@pytest.fixture(scope="module")
def stage1_apply():
  model = _model(_state_dict(_fixture("local")))
  assert model.stage == 1 and model.local_width is None and model.patch == 12
  return jax.jit(model.apply)


def test_local_denoiser_paper_layout(stage1_apply):
  fx = _fixture("local")
  params = convert_prdit.convert_state_dict(_state_dict(fx))
  t = jnp.asarray(fx["t"], jnp.float32)
  out = stage1_apply(params, _ours(fx["x"]), t)
  _close(_theirs(*out), fx["out"], "stage 1, paper layout")
  shifted = stage1_apply(params, _ours(fx["x"] + 0.7), t)
  _close(_theirs(*shifted), fx["out_offset"], "stage 1, window + 0.7")


def test_local_denoiser_two_channels():
  fx = _fixture("local_c2")
  sd = _state_dict(fx)
  model = _model(sd, channels=2)
  assert (model.patch, model.stride, model.channels) == (6, 4, 2)
  params = convert_prdit.convert_state_dict(sd, channels=2)
  out = jax.jit(model.apply)(params, _ours(fx["x"]), jnp.asarray(fx["t"], jnp.float32))
  _close(_theirs(*out), fx["out"], "stage 1, two channels")


def test_dit_block():
  fx = _fixture("dit_block")
  stored = {k[2:]: v for k, v in fx.items() if k.startswith("w/")}
  assert set(stored) == {str(n) for n in fx["names"]}
  for name, value in stored.items():  # the stored weights are the synthetic ones
    np.testing.assert_array_equal(value, _weight(name, value.shape))
  params = convert_prdit.convert_state_dict({f"fine.blocks.0.{k}": v for k, v in stored.items()},
                                            complete=False)["params"]["residual"]["block0"]
  block = prdit.DiTBlock(num_heads=2, mlp_ratio=4.0, attention="xla")
  out = jax.jit(block.apply)({"params": params}, jnp.asarray(fx["x"]), jnp.asarray(fx["c"]))
  _close(out, fx["out"], "DiT block")
  chunked = block.clone(attention="chunked", chunk_size=4)
  _close(jax.jit(chunked.apply)({"params": params}, jnp.asarray(fx["x"]), jnp.asarray(fx["c"])),
         fx["out"], "DiT block, chunked attention")


def test_stage2_forward(stage2, stage1_apply):
  fx, _, params, apply = stage2
  t = jnp.asarray(fx["t"], jnp.float32)
  x = _ours(fx["x"])
  out = apply(params, x, t)
  _close(_theirs(*out), fx["out"], "stage 2")
  local = stage1_apply({"params": {"local": params["params"]["local"]}}, x, t)
  _close(_theirs(*out) - _theirs(*local), fx["fine"], "stage 2 residual (fine) output")


@pytest.mark.parametrize("sampler", ["euler", "pc"])
def test_samplers(stage2, sampler):
  _, model, params, _ = stage2
  fx = _fixture("samplers")
  steps = int(fx["steps"])
  diffusion = trig.TrigDiffusion()
  np.testing.assert_array_equal(diffusion.sample_schedule(steps, sampler)["t"],
                                fx[f"{sampler}_t"])
  denoise = lambda x, t: model.apply(params, x, t)
  noise = jnp.asarray(np.moveaxis(fx["pc_noise"], 2, -1)) if sampler == "pc" else None
  run = jax.jit(lambda z, n: diffusion.sample_with_estimate(denoise, z, steps, sampler, noise=n))
  x, x0 = run(_ours(fx["z"]), noise)
  _close(np.moveaxis(np.asarray(x), -1, 1), fx[f"{sampler}_x"], f"{sampler} sampler, final x")
  _close(np.moveaxis(np.asarray(x0), -1, 1), fx[f"{sampler}_x0"], f"{sampler} sampler, last x0")


def test_training_loss_and_forward_noising(stage2):
  """Their IaNDiffusion.training_losses on the stage-2 network: x_t = cos x0 + sin eps with their
  noise draw (std 0.5), and the image and noise losses (MSE(x0) + MSE(eps), each averaged)."""
  _, model, params, apply = stage2
  fx = _fixture("loss")
  assert [str(n) for n in fx["names"]] == [str(n) for n in _fixture("stage2")["names"]]
  diffusion = trig.TrigDiffusion()
  x0, eps, t = _ours(fx["x"]), _ours(fx["noise"]), jnp.asarray(fx["t"])
  x_t = diffusion.q_sample(x0, t, eps)
  _close(np.moveaxis(np.asarray(x_t), -1, 1), fx["x_t"], "trigonometric forward noising")
  eps_hat, x0_hat = apply(params, x_t, jnp.asarray(fx["model_t"], jnp.float32))
  want = float(np.mean(fx["img_loss"]) + np.mean(fx["noise_loss"]))
  np.testing.assert_allclose(float(diffusion.loss(eps_hat, x0_hat, x0, eps)[0]), want, rtol=1e-4)


@pytest.mark.slow
def test_prdit_b_12_4_at_its_width_and_heads():
  """PRDiT-B/12/4 as published (width 768, 12 heads, 4 DiT blocks, paper-layout stage 1) on 8
  tokens: the converter reads the width and heads, and the forward matches theirs."""
  fx = np.load(FIXTURES / "prdit_b.npz")
  state_dict = {str(n): make_paper_sizes.paper_weight(str(n), s) for n, s in
                zip(fx["names"], make_prdit.table_shapes(fx["shapes"]))}
  fields = convert_prdit.infer_fields(state_dict)
  assert (fields["width"], fields["heads"], fields["depth"], fields["patch"]) == (768, 12, 4, 12)
  model = prdit.PRDiT(**dict(fields, attention="xla"))
  assert prdit.prdit_from_name("B/12/4").width == 768 and prdit.prdit_from_name("B/12/4").heads == 12
  params = convert_prdit.convert_state_dict(state_dict)
  x = _ours(make_paper_sizes.inputs("paper/prdit/x", (2, 1, 16, 16, 16)))
  out = jax.jit(model.apply)(params, x, jnp.asarray(fx["t"], jnp.float32))
  _close(_theirs(*out), fx["out"], "PRDiT-B/12/4")


def test_position_code():
  fx = _fixture("position")
  for key, want in fx.items():
    g, d = (int(v[1:]) for v in key.split("_"))
    _close(prdit.position_code((g, g, g), d), want, f"position code, grid {g}, width {d}")


def _relative_offset_change(apply, params, x, t, offset=0.7):
  a = np.concatenate([np.asarray(v) for v in apply(params, x, t)], -1)
  b = np.concatenate([np.asarray(v) for v in apply(params, x + offset, t)], -1)
  return float(np.linalg.norm(b - a) / np.linalg.norm(a))


def test_stage1_sees_a_windows_mean_level(stage1_apply):
  """A constant added to every voxel must change stage 1's output (no norm on the read-out)."""
  fx = _fixture("local")
  params = convert_prdit.convert_state_dict(_state_dict(fx))
  x, t = _ours(fx["x"]), jnp.asarray(fx["t"], jnp.float32)
  assert _relative_offset_change(stage1_apply, params, x, t) > 1e-2
  # The tiny test layout (a per-token Dense first) from a fresh init with perturbed weights.
  tiny = prdit.PRDiT(stage=1, local_width=16, width=16, heads=2)
  init = tiny.init(jax.random.PRNGKey(0), x, t)["params"]
  leaves, treedef = jax.tree_util.tree_flatten(init)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  noisy = jax.tree_util.tree_unflatten(
      treedef, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  assert _relative_offset_change(jax.jit(tiny.apply), {"params": noisy}, x, t) > 1e-2


def test_converter_checkpoints_and_command_line(tmp_path):
  sd = _state_dict(_fixture("local_c2"))
  want = convert_prdit.convert_state_dict(sd, channels=2)
  # Their train.py checkpoints nest the weights under "model" (raw) and "ema"; DDP adds "module.".
  ckpt = {"model": {f"module.{k}": v for k, v in sd.items()},
          "ema": {k: v + 1 for k, v in sd.items()}, "train_steps": 7}
  raw = convert_prdit.state_dict_from_checkpoint(ckpt, "model")
  assert raw.keys() == sd.keys()
  ema = convert_prdit.state_dict_from_checkpoint(ckpt)  # their sample.py's choice
  np.testing.assert_array_equal(ema["t_embedder.mlp.0.bias"], sd["t_embedder.mlp.0.bias"] + 1)
  with pytest.raises(ValueError, match="no 'ema'"):
    convert_prdit.state_dict_from_checkpoint({"model": sd})
  with pytest.raises(ValueError, match="not PRDiT parameters"):
    convert_prdit.convert_state_dict(dict(sd, **{"head.weight": np.zeros((2, 2))}), channels=2)
  with pytest.raises(ValueError, match="lacks"):
    convert_prdit.convert_state_dict({k: v for k, v in sd.items() if ".mlp2." not in k}, 2)
  source = tmp_path / "their.npz"
  np.savez(source, **sd)
  for suffix in ("msgpack", "npz"):
    out = tmp_path / f"ours.{suffix}"
    assert convert_prdit.main([str(source), str(out), "--channels", "2"]) == 0
    got = convert_prdit.load_variables(str(out))
    flat_got = dict(jax.tree_util.tree_flatten_with_path(got)[0])
    flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    assert flat_got.keys() == flat_want.keys()
    for k, v in flat_want.items():
      np.testing.assert_array_equal(np.asarray(flat_got[k]), v)
  assert convert_prdit.main([str(source), str(tmp_path / "x.msgpack")]) == 1  # wrong channels


# ================================================================================================
# 2b. PRDiT-FM: flow matching on the PRDiT network
#
# Fredy-Zhang/PRDiT-FM (tests/fixtures/authors/prdit_fm.npz, written by make_prdit_fm.py; README.md)
# trains the same network with one velocity channel (`learn_sigma=False`) by straight-line flow
# matching. Fixture: their `FlowMatching` on their stage-2 PRDiT (the prdit_stage2 arguments,
# synthetic weights): the per-example loss at fixed t with the noise it drew, the t = 0.5
# reconstruction, and 4-step Euler and Heun samples from fixed noise, with the scaled times the
# network saw. Compared with jaxvol.diffusion.flow on the converted network.
# ================================================================================================


@pytest.fixture(scope="module")
def flow_model():
  fx = _fixture("fm")
  sd = _state_dict(fx)
  model = _model(sd)
  assert model.outputs == 1 and model.stage == 2 and model.depth == 2
  params = convert_prdit.convert_state_dict(sd)
  return fx, jax.jit(lambda x, t: model.apply(params, x, t))


def _theirs1(v):
  return np.moveaxis(np.asarray(v), -1, 1)


def test_flow_matching_loss_and_reconstruction(flow_model):
  fx, velocity = flow_model
  fm = flow.FlowMatching()
  x, t = _ours(fx["x"]), jnp.asarray(fx["t"])
  np.testing.assert_allclose(np.asarray(fm.model_t(t)), fx["loss_model_t"], rtol=1e-6)
  _, aux = fm.training_loss(velocity, x, jax.random.PRNGKey(0), t=t,
                            x_noise=_ours(fx["loss_noise"]))
  _close(aux["per_example"], fx["loss"], "flow-matching loss per example")
  recon, x_t = fm.reconstruct(velocity, x, _ours(fx["recon_noise"]), 0.5)
  _close(_theirs1(x_t), fx["recon_xt"], "x_t at t = 0.5")
  _close(_theirs1(recon), fx["recon"], "reconstruction at t = 0.5")


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_flow_matching_samplers(flow_model, solver):
  fx, velocity = flow_model
  fm = flow.FlowMatching()
  steps = int(fx["steps"])
  assert fm.nfe(steps, solver) == int(fx[f"{solver}_nfe"])
  np.testing.assert_allclose(fm.network_times(steps, solver), fx[f"{solver}_t"], rtol=1e-6)
  x = jax.jit(lambda z: fm.sample(velocity, z, steps, solver))(_ours(fx["z"]))
  _close(_theirs1(x), fx[f"{solver}_x"], f"flow matching, {solver} sample")


# ================================================================================================
# 3. Generation metrics
#
# PRDiT's generation metrics, output for output: jaxvol.eval.generation against their code.
#
# Fixtures (tests/fixtures/authors/metrics_*.npz, README.md) hold what Fredy-Zhang/PRDiT's
# evaluations/fid.py, mmd.py, ms_ssim.py (MONAI-generative's MultiScaleSSIMMetric) and their 3D
# ResNet returned on small fixed inputs; make_metrics.py made them.
# ================================================================================================

CASES = ("full", "singular", "odd")  # N > F; N < F (singular covariances); odd N


@pytest.fixture(scope="module")
def feats():
  with np.load(FIXTURES / "metrics_features.npz") as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def msssim():
  with np.load(FIXTURES / "metrics_msssim.npz") as f:
    out = {k: f[k] for k in f.files}
  out["volumes"] = out["codes"].astype(np.float32) / np.float32(127.5) - np.float32(1.0)
  return out


@pytest.mark.parametrize("case", CASES)
def test_fid_matches_their_sqrtm_route(feats, case):
  real, fake, theirs = feats[f"{case}/real"], feats[f"{case}/fake"], float(feats[f"{case}/fid"])
  # sqrtm of a product of singular (or nearly singular) covariances amplifies rounding: the
  # same numpy/scipy agree to 1e-10 on one CPU and to 3e-9 on another, whose BLAS kernels round
  # differently. A different formula (eps, the trace term, the real part) moves it by >= 1e-4.
  assert generation.frechet_distance(real, fake, "sqrtm") == pytest.approx(theirs, rel=5e-8)
  # The eigendecomposition route (protocol "jaxvol") is the same quantity; it only rounds
  # differently where the covariances are singular.
  assert generation.frechet_distance(real, fake, "eigh") == pytest.approx(theirs, rel=1e-7)


@pytest.mark.parametrize("case", CASES)
def test_mmd_matches_their_main(feats, case):
  real, fake = feats[f"{case}/real"], feats[f"{case}/fake"]
  sigma = generation.real_median_bandwidth(real)
  # gamma = 1 / (2 m) with m the lower median of all N^2 real-real squared distances.
  assert 1.0 / (2.0 * sigma**2) == pytest.approx(float(feats[f"{case}/mmd_gamma"]), rel=1e-10)
  mmd2 = generation.mmd_rbf(real, fake, sigma)
  assert mmd2 == pytest.approx(float(feats[f"{case}/mmd2"]), rel=1e-10)
  assert np.sqrt(mmd2) == pytest.approx(float(feats[f"{case}/mmd"]), rel=1e-10)
  assert np.sqrt(mmd2) == pytest.approx(float(feats[f"{case}/mmd_printed"]), rel=1e-6)


def test_bandwidth_details_matter(feats):
  real, fake = feats["singular/real"], feats["singular/fake"]
  sq = ((real[:, None] - real[None]) ** 2).sum(-1)
  theirs = 1.0 / (2.0 * float(feats["singular/mmd_gamma"]))
  assert generation.real_median_bandwidth(real) ** 2 == pytest.approx(theirs, rel=1e-12)
  # np.median would average the two middle values of the even count (+3% here), dropping the
  # diagonal moves the median up (+7%); pooling the generated features (protocol "jaxvol")
  # moves it wherever the generated set lies (-0.03% here, +38% in case "full").
  assert np.median(sq) / theirs - 1.0 > 0.02
  assert np.median(sq[np.triu_indices(len(real), 1)]) / theirs - 1.0 > 0.05
  assert abs(generation.median_bandwidth(real, fake) ** 2 / theirs - 1.0) > 1e-4
  full = feats["full/real"], feats["full/fake"]
  assert generation.median_bandwidth(*full) / generation.real_median_bandwidth(full[0]) > 1.1


def _identity_features(dim):
  """Features stored as (N, 1, 1, F) 'volumes', so generation_report runs on fixed features."""
  return generation.FeatureNetwork("identity", lambda x: x.reshape(x.shape[0], -1),
                                   pretrained=True, dim=dim, batch_size=8)


@pytest.mark.parametrize("case", CASES)
def test_report_on_the_authors_protocol(feats, case):
  real, fake = feats[f"{case}/real"], feats[f"{case}/fake"]
  report = generation.generation_report(real[:, None, None], fake[:, None, None],
                                        _identity_features(real.shape[1]))
  assert report["protocol"] == "authors" and report["feature_input"].startswith("as given")
  # The feature network sees float32, as their CUDA features are; the statistics run in float64.
  assert report["fid"] == pytest.approx(float(feats[f"{case}/fid"]), rel=1e-4)
  assert report["mmd"] == pytest.approx(float(feats[f"{case}/mmd"]), rel=1e-4)
  assert report["mmd_squared"] == pytest.approx(float(feats[f"{case}/mmd2"]), rel=1e-4)
  assert (report["n_real"], report["n_fake"]) == (len(real), len(fake))
  assert report["ms_ssim_diversity"] is None and "48" in report["ms_ssim_note"]


def test_their_ms_ssim_loop_scores_every_ordered_pair(msssim):
  n = len(msssim["volumes"])
  assert sorted(map(tuple, msssim["pairs"])) == list(itertools.permutations(range(n), 2))
  assert (int(msssim["kernel_size"]), float(msssim["data_range"])) == (3, 1.0)
  assert float(msssim["mean"]) == pytest.approx(float(msssim["mean_printed"]), abs=1e-6)


def test_ms_ssim_matches_monai(msssim):
  v, pairs, theirs = msssim["volumes"], msssim["pairs"], msssim["values"]
  assert v.shape[1:] == (48, 52, 60)  # odd sizes at coarser scales: pooling drops a voxel
  ours = generation.monai_ms_ssim(v[pairs[:, 0]], v[pairs[:, 1]])
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)
  assert np.sum(theirs == 0.0) == 2 and np.all(ours[theirs == 0.0] == 0.0)  # negative -> 0
  mean, count = generation.monai_ms_ssim_diversity(v, batch_size=4)
  assert count == len(v) * (len(v) - 1) // 2
  assert mean == pytest.approx(float(msssim["mean"]), rel=1e-4)


def test_ms_ssim_size_limit_is_monais():
  assert generation.monai_ms_ssim_min_size() == 48
  x = np.zeros((48, 48, 47), np.float32)
  with pytest.raises(ValueError, match=">= 48"):
    generation.monai_ms_ssim(x, x)


@pytest.fixture(scope="module", params=["metrics_resnet", "metrics_resnet50"])
def resnet(request):
  """Their ResNet-10 and ResNet-50 (the depth their FID uses: bottleneck blocks, 2048 features)."""
  with np.load(FIXTURES / f"{request.param}.npz") as f:
    fixture = {k: f[k] for k in f.files}
  make = load_module(FIXTURES / "make_metrics.py", "make_metrics_under_test")
  assert int(fixture["recipe_seed"]) == make.RECIPE_SEED
  model = medicalnet.resnet(int(fixture["depth"]), width=64)  # their widths are fixed at 64
  names = medicalnet.to_torch_state_dict(medicalnet.init_variables(model, 0))
  assert sorted(names) == list(fixture["names"])
  state = make.recipe_weights({k: v.shape for k, v in names.items()})
  fixture["variables"] = medicalnet.convert_torch_state_dict(
      {"state_dict": {f"module.{k}": v for k, v in state.items()}})
  return fixture


def test_features_take_volumes_as_they_are(resnet):
  vols, theirs = resnet["volumes"], resnet["features"]
  assert vols.shape == (3, 10, 12, 16)  # not cubic, so a wrong axis order could not match
  assert theirs.shape == (3, 2048 if int(resnet["depth"]) == 50 else 512)
  net = generation.medicalnet_features(resnet["variables"], batch_size=4)
  assert not net.standardize
  # The jaxvol convention, a per-volume z-score before the network, rides in the same batch.
  zscored = (vols[:1] - vols[:1].mean()) / vols[:1].std()
  ours = net(np.concatenate([vols, zscored]))
  np.testing.assert_allclose(ours[:3], theirs, rtol=1e-4, atol=1e-5 * np.abs(theirs).max())
  assert np.abs(ours[3] - theirs[0]).max() > 1e-2 * np.abs(theirs).max()
