"""Spatial sharding: one volume over several devices gives the one-device numbers, in training and
sampling, and the compiled U-Net step exchanges halos instead of gathering whole feature maps."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from conftest import ROOT
from conftest import load_module
from jaxvol import config as base
from jaxvol import methods
from jaxvol.eval import samplers
from jaxvol.models import layers
from jaxvol.parallel import mesh as mesh_lib
from jaxvol.parallel import sharding as sharding_lib
from jaxvol.train import loop
from jaxvol.train import plan as plan_lib
from jaxvol.train import state as state_lib

# End to end (sharded runs against one device): `pytest -m 'not slow'` skips it.
pytestmark = [pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (fake) devices"),
              pytest.mark.slow]


_load = load_module


def smoke(method, data=1, spatial=1, model=1):
  c = base.set_method(base.base_config(), method)
  base.smoke_overrides(c)
  c.model.stm_dim = 8
  c.data.batch_size = 2
  c.sparse.f_steps = 2
  c.mesh.data, c.mesh.spatial, c.mesh.model = data, spatial, model
  return c


def prdit_smoke(data=1, spatial=1, model=1):
  c = _load(ROOT / "configs" / "prdit_ct_gen.py", "prdit_ct_gen_for_spatial").get_config("smoke")
  c.mesh.data, c.mesh.spatial, c.mesh.model = data, spatial, model
  return c


def _batch(config):
  rng = np.random.default_rng(0)
  shape = (config.data.batch_size,) + tuple(config.data.crop_size)
  n_cond = len(config.data.inputs)
  return {"cond": rng.normal(size=shape + (n_cond,)).astype(np.float32),
          "target": rng.normal(size=shape + (1,)).astype(np.float32)}


_RUNS = {}


def _config(method, layout=(1, 1, 1)):
  return prdit_smoke(*layout) if method == "prdit" else smoke(method, *layout)


def initial_state(method):
  """The method's initial train state on the host, created once (the same on every mesh)."""
  key = (method, "init")
  if key not in _RUNS:
    config = _config(method)
    parts = loop.build_everything(config, "")
    _RUNS[key] = jax.device_get(state_lib.create_state(
        parts.method, parts.optimizer, jax.random.PRNGKey(0), parts.example,
        parts.state_sharding))
  return _RUNS[key]


def train_two_steps(method, layout=(1, 1, 1)):
  """Two steps of the library's compiled train step on a (data, spatial, model) mesh; cached.

  Returns dict(params, metrics, parts, hlo) with host values and the compiled step's HLO text.
  """
  key = (method, tuple(layout))
  if key not in _RUNS:
    config = _config(method, layout)
    parts = loop.build_everything(config, "")
    state = jax.device_put(initial_state(method), parts.state_sharding)
    compiled, _ = loop.compile_step(parts, config)
    bsh = mesh_lib.batch_sharding(parts.mesh)
    batch = {k: jax.device_put(v, bsh) for k, v in _batch(config).items()}
    rng = jax.device_put(jax.random.PRNGKey(3), mesh_lib.replicated(parts.mesh))
    for _ in range(2):
      state, metrics = compiled(state, batch, rng)
    _RUNS[key] = dict(params=jax.device_get(state["params"]), metrics=jax.device_get(metrics),
                      parts=parts, hlo=compiled.as_text())
  return _RUNS[key]


def assert_same_training(run, ref):
  np.testing.assert_allclose(run["metrics"]["loss"], ref["metrics"]["loss"], rtol=1e-5)
  np.testing.assert_allclose(run["metrics"]["grad_norm"], ref["metrics"]["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(run["params"]), jax.tree.leaves(ref["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_group_norm_statistics_are_exact_across_depth_shards():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 6, 5, 8)) * 3.0 + 1.5
  x = x * jnp.linspace(0.2, 2.0, 16)[None, :, None, None, None]  # stats differ between slabs
  norm = layers.group_norm(8, 4, jnp.float32)
  params = norm.init(jax.random.PRNGKey(1), x)
  mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(1, 4, 1), mesh_lib.AXES)
  sharded = jax.jit(norm.apply, in_shardings=(mesh_lib.replicated(mesh),
                                              mesh_lib.batch_sharding(mesh)))
  out = sharded(params, jax.device_put(x, mesh_lib.batch_sharding(mesh)))
  g = np.asarray(x, np.float64).reshape(2, 16, 6, 5, 4, 2)
  mean = g.mean(axis=(1, 2, 3, 5), keepdims=True)
  var = g.var(axis=(1, 2, 3, 5), keepdims=True)
  ref = ((g - mean) / np.sqrt(var + 1e-6)).reshape(x.shape)
  np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5)
  np.testing.assert_allclose(np.asarray(out), np.asarray(jax.jit(norm.apply)(params, x)), atol=2e-6)


# PPDM's (data, spatial) layouts (2, 2) and (1, 4): test_train.test_sharded_step_equals_unsharded.
@pytest.mark.parametrize("method,layout", [("full3d", (1, 4, 1)), ("sparse", (2, 2, 1))])
def test_spatial_train_step_equals_one_device(method, layout):
  run = train_two_steps(method, layout)
  assert run["parts"].mesh.shape["spatial"] == layout[1]
  assert_same_training(run, train_two_steps(method))


def test_prdit_fsdp_and_token_sharding_equal_one_device():
  run = train_two_steps("prdit", (1, 2, 2))
  # The residual DiT's large kernels live on 1/model of the devices' memory each, their AdamW
  # moments and EMA alike; the frozen local denoiser stays replicated.
  sh = run["parts"].state_sharding
  residual = sh["params"]["params"]["residual"]["block0"]
  assert residual["mlp_in"]["kernel"].spec == P(None, "model")
  assert residual["mlp_out"]["kernel"].spec == P("model", None)
  assert sh["ema_params"]["params"]["residual"]["block0"]["attn"]["qkv"]["kernel"].spec == P(
      None, "model")
  moments = [s for s in jax.tree.leaves(sh["opt_state"]) if "model" in tuple(s.spec)]
  assert len(moments) >= 2 * 5  # mu and nu of every named kernel
  assert all(sharding_lib.is_replicated(s) for s in
             jax.tree.leaves(sh["params"]["params"]["local"]))
  assert_same_training(run, train_two_steps("prdit"))


def test_logical_rules_agree_with_the_mesh_layouts():
  assert sharding_lib.mesh_axes(layers.VOLUME_AXES)[:2] == tuple(
      mesh_lib.batch_sharding(Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1),
                                   mesh_lib.AXES)).spec)
  assert tuple(sharding_lib.mesh_axes(("batch", "tokens", "embed"))) == ("data", "spatial", None)
  assert tuple(sharding_lib.mesh_axes(("embed", "mlp"))) == (None, "model")
  mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(1, 1, 4), mesh_lib.AXES)
  spec, fallbacks = sharding_lib.fit_spec(mesh, P(None, "model"), (8, 6))
  assert spec == P(None, None) and fallbacks == [(1, "model")]


def _noisy(params, scale=0.05):
  """Random weights everywhere (zero-initialised convolutions included)."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
  return jax.tree.unflatten(treedef, [p + scale * jax.random.normal(k, p.shape, p.dtype)
                                      for p, k in zip(leaves, keys)])


@pytest.mark.parametrize("method", ["full3d", "ppdm", "sparse", "prdit"])
def test_sharded_sampler_equals_one_device(method):
  config = _config(method)
  if method == "full3d":
    # v prediction: with eps prediction DDIM's first x0 estimate, (x - sqrt(1 - abar) eps) /
    # sqrt(abar) at t = T, multiplies any float reassociation in the network by ~160.
    config.diffusion.parameterization = "v"
  m = methods.build(config, "cpu")
  cond_shape = (1, 16, 16, 8, m.cond_channels)
  params = _noisy(initial_state(method)["params"])
  cond = jax.random.normal(jax.random.PRNGKey(1), cond_shape)
  rng = jax.random.PRNGKey(2)
  ref = jax.jit(m.sample)(params, cond, rng)

  mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(1, 4, 1), mesh_lib.AXES)
  sampler = samplers.jit_sample(m, mesh)
  out = sampler(params, jax.device_put(cond, mesh_lib.batch_sharding(mesh)), rng)
  assert out.shape == cond_shape[:4] + (1,)
  assert out.sharding.shard_shape(out.shape)[1] == 4  # every device holds a quarter of the depth
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)
  if method in ("full3d", "ppdm"):
    # The loop carry stays split: no whole feature map is gathered anywhere in the sampler.
    hlo = sampler.lower(params, cond, rng).compile().as_text()
    assert not plan_lib.whole_volume_gathers(hlo, cond_shape[1:4], min_depth=4)


def test_sharded_sampler_refuses_windows():
  config = smoke("full3d")
  config.inference.window = (16, 16, 16)
  mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(1, 4, 1), mesh_lib.AXES)
  with pytest.raises(ValueError, match="window"):
    samplers.jit_sample(methods.build(config, "cpu"), mesh)


def test_spatial_unet_step_exchanges_halos_and_gathers_no_whole_volume():
  hlo = train_two_steps("full3d", (1, 4, 1))["hlo"]  # the 16^3 crop on 4 depth shards
  ops = [op for op, _ in plan_lib.collectives(hlo)]
  assert "collective-permute" in ops  # the convolution halos
  assert "all-reduce" in ops  # GroupNorm statistics, the loss and the gradients
  # No all-gather of a whole feature map at any level of the U-Net (16^3 and 8^3).
  assert plan_lib.whole_volume_gathers(hlo, (16, 16, 16), min_depth=4) == []


def test_whole_volume_gather_detector_sees_a_gathering_op():
  """Control: an op XLA cannot split along depth (a gather-based resize) is flagged."""
  mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(1, 4, 1), mesh_lib.AXES)
  bsh = NamedSharding(mesh, P("data", "spatial"))
  up = lambda x: jax.image.resize(x, (1, 32, 16, 16, 2), method="nearest") * 2.0
  x = jax.ShapeDtypeStruct((1, 16, 8, 8, 2), jnp.float32, sharding=bsh)
  hlo = jax.jit(up, out_shardings=bsh).lower(x).compile().as_text()
  found = plan_lib.whole_volume_gathers(hlo, (32, 16, 16), min_depth=4)
  assert found and found[0]["shape"] == "f32[1, 16, 8, 8, 2]"
  assert found[0]["bytes"] == 16 * 8 * 8 * 2 * 4


def test_upsampling_matches_nearest_resize():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4, 5, 6))
  ref = jax.image.resize(x, (2, 6, 8, 10, 6), method="nearest")
  np.testing.assert_array_equal(np.asarray(layers.upsample_nearest(x, 2)), np.asarray(ref))


def test_constraints_are_inert_without_rules():
  x = jnp.ones((1, 8, 4, 4, 2))
  assert nn.get_logical_axis_rules() == ()
  jaxpr = jax.make_jaxpr(layers.constrain_volume)(x)
  assert "sharding_constraint" not in str(jaxpr)
