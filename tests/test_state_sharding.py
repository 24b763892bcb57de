"""ZeRO / FSDP layouts of the train state (config.mesh.state_sharding): which leaves are split and
how, the same training as one device, smaller compiled arguments, and checkpoints that restore on
a replicated one-device run."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from test_spatial import _batch
from test_train import smoke_config
from test_train import tiny_store  # noqa: F401  (a fixture)
from jaxvol import trees
from jaxvol.parallel import mesh as mesh_lib
from jaxvol.parallel import sharding as sharding_lib
from jaxvol.train import checkpoint as ckpt_lib
from jaxvol.train import loop
from jaxvol.train import plan as plan_lib
from jaxvol.train import state as state_lib

# End to end (sharded runs against one device): `pytest -m 'not slow'` skips it.
pytestmark = [pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (fake) devices"),
              pytest.mark.slow]

ZS = ("data", "spatial")
MIN_SIZE = 1024  # the smoke U-Net's 3x3x3 kernels (>= 1,728 elements) split, its biases do not


def _mesh(data, spatial, model=1):
  devices = np.asarray(jax.devices()[:data * spatial * model]).reshape(data, spatial, model)
  return Mesh(devices, mesh_lib.AXES)


def _config(layout=(1, 1), mode="replicated", store="unused", steps=2):
  c = smoke_config(store, "ppdm", steps=steps)
  c.mesh.data, c.mesh.spatial = layout
  c.mesh.state_sharding = mode
  c.mesh.state_sharding_min_size = MIN_SIZE
  return c


def _split(tree) -> list:
  return [s for s in jax.tree.leaves(tree) if not sharding_lib.is_replicated(s)]


# Layout rules.

def test_zero_spec_takes_the_largest_divisible_dimension():
  mesh = _mesh(2, 2)
  assert sharding_lib.zero_spec(mesh, (3, 3, 3, 16, 32), 0) == P(None, None, None, None, ZS)
  assert sharding_lib.zero_spec(mesh, (3, 3, 3, 32, 32), 0) == P(None, None, None, None, ZS)
  assert sharding_lib.zero_spec(mesh, (3, 3, 3, 24, 8), 0) == P(None, None, None, ZS, None)
  assert sharding_lib.zero_spec(mesh, (8, 6), 0) == P(ZS, None)  # 6 is not divisible by 4
  assert sharding_lib.zero_spec(mesh, (6, 10), 0) is None
  assert sharding_lib.zero_spec(mesh, (2, 2), 0) is None
  assert sharding_lib.zero_spec(mesh, (64,), 2**14) is None  # a bias: under the threshold
  assert sharding_lib.zero_spec(mesh, (3, 3, 3, 32, 32), 2**14) == P(None, None, None, None, ZS)
  assert sharding_lib.zero_spec(_mesh(1, 1, 4), (3, 3, 3, 32, 32), 0) is None  # data x spatial = 1


def test_state_layouts_by_mode():
  mesh = _mesh(1, 2, 2)  # model = 2: the DiT-style kernel stays on "model"
  shapes = {"conv": jax.ShapeDtypeStruct((3, 3, 3, 16, 32), np.float32),
            "bias": jax.ShapeDtypeStruct((32,), np.float32),
            "odd": jax.ShapeDtypeStruct((3, 3, 3, 5, 7), np.float32),
            "dit": jax.ShapeDtypeStruct((64, 128), np.float32)}
  own, notes = sharding_lib.param_shardings(
      mesh, shapes, {"conv": P(), "bias": P(), "odd": P(), "dit": P(None, "mlp")})
  assert not notes and own["dit"].spec == P(None, "model")

  params, moments = sharding_lib.state_layouts(mesh, shapes, own, "replicated", 0)
  assert params is own and moments is own

  params, moments = sharding_lib.state_layouts(mesh, shapes, own, "zero1", 0)
  assert params is own
  assert moments["conv"].spec == P(None, None, None, None, ZS)
  assert moments["bias"].spec == P(ZS)
  assert sharding_lib.is_replicated(moments["odd"])  # no dimension divisible by 2
  assert moments["dit"] is own["dit"]

  params, moments = sharding_lib.state_layouts(mesh, shapes, own, "fsdp", 64)
  assert params is moments
  assert params["conv"].spec == P(None, None, None, None, ZS)
  assert sharding_lib.is_replicated(params["bias"])  # 32 elements < 64
  assert params["dit"] is own["dit"]

  with pytest.raises(ValueError, match="'replicated', 'zero1', 'fsdp'"):
    sharding_lib.state_layouts(mesh, shapes, own, "zero3")


def test_replicated_mode_is_the_layout_from_before():
  c = _config((2, 2))
  parts = loop.build_everything(c, "")
  mesh, shapes = parts.mesh, parts.abstract_state
  own, _ = sharding_lib.param_shardings(mesh, shapes["params"])
  before = sharding_lib.state_shardings(mesh, shapes, own)
  assert parts.state_sharding == before and parts.state_sharding_mode == "replicated"
  assert not _split(parts.state_sharding)
  del c.mesh["state_sharding"]  # a config written before the field existed
  assert loop.build_everything(c, "").state_sharding == before


def test_build_everything_applies_the_mode():
  zero1 = loop.build_everything(_config((2, 2), "zero1"), "").state_sharding
  assert not _split(zero1["params"])
  kernel = ("params", "mid0", "conv1", "kernel")  # (3, 3, 3, 16, 16)
  assert trees.flat_paths(zero1["ema_params"])[kernel].spec == P(None, None, None, None, ZS)
  moments = {p[-5:]: s for p, s in trees.flat_paths(zero1["opt_state"]).items()}
  for which in ("mu", "nu"):
    assert moments[(which,) + kernel].spec == P(None, None, None, None, ZS)
    assert sharding_lib.is_replicated(moments[(which,) + kernel[:-1] + ("bias",)])
  fsdp = loop.build_everything(_config((2, 2), "fsdp"), "").state_sharding
  assert trees.flat_paths(fsdp["params"])[kernel].spec == P(None, None, None, None, ZS)
  assert len(_split(fsdp["params"])) == len(_split(zero1["ema_params"])) > 10
  one = loop.build_everything(_config((1, 1), "fsdp"), "")
  assert one.state_sharding_mode == "replicated" and not _split(one.state_sharding)
  with pytest.raises(ValueError, match="state_sharding 'zero2'"):
    loop.build_everything(_config((2, 2), "zero2"), "")


# Training.

_RUNS = {}


def _initial_state():
  """The initial train state on the host, the same for every mesh and layout."""
  if "init" not in _RUNS:
    parts = loop.build_everything(_config(), "")
    _RUNS["init"] = jax.device_get(state_lib.create_state(
        parts.method, parts.optimizer, jax.random.PRNGKey(0), parts.example,
        parts.state_sharding))
  return _RUNS["init"]


def _train(layout, mode, steps=2):
  """`steps` steps of the library's compiled step; cached. Returns state, cost, HLO, shardings."""
  key = (layout, mode)
  if key not in _RUNS:
    c = _config(layout, mode)
    parts = loop.build_everything(c, "")
    state = jax.device_put(_initial_state(), parts.state_sharding)
    compiled, cost = loop.compile_step(parts, c)
    bsh = mesh_lib.batch_sharding(parts.mesh)
    batch = {k: jax.device_put(v, bsh) for k, v in _batch(c).items()}
    rng = jax.device_put(jax.random.PRNGKey(3), mesh_lib.replicated(parts.mesh))
    for _ in range(steps):
      state, _ = compiled(state, batch, rng)
    _RUNS[key] = dict(state=jax.device_get(state), cost=cost, hlo=compiled.as_text(),
                      shardings=jax.tree.map(lambda x: x.sharding, state))
  return _RUNS[key]


# zero1 with the whole depth split over 4 devices, fsdp on data = 2 x spatial = 2: either, without
# GatheredMethod, lets a kernel's channel split reach the activations (whole-volume all-gathers).
@pytest.mark.parametrize("layout,mode", [((1, 4), "zero1"), ((2, 2), "fsdp")])
def test_sharded_state_trains_as_one_device(layout, mode):
  run, ref = _train(layout, mode), _train((1, 1), "replicated")
  sh = run["shardings"]
  assert _split(sh["ema_params"]) and _split(sh["opt_state"])
  assert bool(_split(sh["params"])) == (mode == "fsdp")
  paths = trees.flat_paths(run["state"])
  for path, want in trees.flat_paths(ref["state"]).items():
    np.testing.assert_allclose(np.asarray(paths[path]), np.asarray(want), rtol=0, atol=1e-5,
                               err_msg="/".join(path))
  assert int(run["state"]["step"]) == 2
  assert plan_lib.whole_volume_gathers(run["hlo"], (16, 16, 16), min_depth=layout[1]) == []


def test_sharded_state_shrinks_the_compiled_arguments():
  # Every layout here has 4 devices holding a quarter of the batch each, so the arguments differ
  # by the state alone (zero1 is the (1, 4) run above: one compile less).
  runs = {"replicated": ((2, 2), "replicated"), "zero1": ((1, 4), "zero1"),
          "fsdp": ((2, 2), "fsdp")}
  got = {m: _train(*run)["cost"] for m, run in runs.items()}
  args = {m: c["argument_bytes"] for m, c in got.items()}
  assert args["fsdp"] < args["zero1"] < args["replicated"], args
  assert got["fsdp"]["bytes"] < got["replicated"]["bytes"], got


# Checkpoints.

def _restore(workdir, config):
  """The latest checkpoint of `workdir` restored into `config`'s layout."""
  parts = loop.build_everything(config, workdir)
  ck = ckpt_lib.Checkpointer(workdir, with_data=False, async_save=False)
  try:
    state, _ = ck.restore(parts.abstract_state)
  finally:
    ck.close()
  return state


def test_fsdp_checkpoint_restores_replicated_on_one_device(tiny_store, tmp_path):  # noqa: F811
  c4 = _config((2, 2), "fsdp", store=tiny_store / "store", steps=2)
  c4.train.checkpoint_every = 1
  loop.train(c4, str(tmp_path))
  saved = _restore(str(tmp_path), c4)
  assert int(saved["step"]) == 2 and _split(saved["params"]) and _split(saved["opt_state"])
  one = _config((1, 1), "replicated", store=tiny_store / "store", steps=2)
  restored = _restore(str(tmp_path), one)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved), strict=True):
    assert a.sharding.device_set == {jax.devices()[0]}
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_plan_reports_the_state_layout(tmp_path):
  report = plan_lib.plan(_config((1, 1), "fsdp"), str(tmp_path),
                         {"data": 2, "spatial": 2, "model": 1}, write=False)
  st = report["state"]
  assert st["mode"] == st["in_effect"] == "fsdp" and st["min_size"] == MIN_SIZE
  assert st["per_device_bytes"] < st["bytes"] / 2
  assert report["params"]["sharded_bytes"] > report["params"]["replicated_bytes"]
  assert "train state layout fsdp" in plan_lib.format_report(report)
