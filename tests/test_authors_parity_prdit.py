"""PRDiT against the authors' code (Fredy-Zhang/PRDiT): module outputs and samplers, to rtol 1e-4.

The fixtures (tests/fixtures/authors/prdit_*.npz, written by make_prdit.py; provenance in
README_prdit.md) hold the outputs of the authors' PyTorch modules on fixed inputs. The weights go
through jaxvol.models.convert_prdit by their PyTorch names; most are recomputed from name and shape
(make_prdit.synthetic_weight, too many to store in the paper layout). Their volumes are
(B, C, D, H, W) and ours (B, D, H, W, C): the harness transposes, and their (B, 2C, ...) output is
compared with our (eps, x0) pair, eps first. Token order and output blocks agree without any
permutation (jaxvol.models.prdit docstring); their channel-major windows are handled by the
converter (the two-channel fixture checks it).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT
from conftest import load_module
from jaxvol.diffusion import trig
from jaxvol.models import convert_prdit
from jaxvol.models import prdit

FIXTURES = ROOT / "tests" / "fixtures" / "authors"
make_prdit = load_module(FIXTURES / "make_prdit.py", "make_prdit_weights")
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
