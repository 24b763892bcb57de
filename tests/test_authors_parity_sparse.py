"""Sparse voxel-space diffusion in the authors' layout against their PyTorch code, output for
output.

Fixture: tests/fixtures/authors/sparse_unet.npz, written by tests/fixtures/authors/make_sparse.py
from mirthAI/sparse-3d-diffusion (README_sparse.md): a tiny `SuperResModel_noatt` (UNetModel +
HybridCondEncoder; widths 8/16/16, one res block, 2-head attention at the 1/4 level, 4-group
GroupNorm), its weights as their state dict, its output on fixed inputs and one run of their
sampler (`ddim_sample_loop`, f_steps 5) from a fixed x_T. Their volumes are (B, C, D, H, W), ours
(B, D, H, W, C): only the channel axis moves.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvol.diffusion import gaussian
from jaxvol.diffusion import sparse
from jaxvol.models import convert_sparse
from jaxvol.models import stm
from jaxvol.models import unet3d

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "authors", "sparse_unet.npz")
# Their SuperResModel_noatt at the paper's size (configs/ps128_*.yml: width 64, mults
# (1, 1, 2, 2, 4), 2 res blocks, attention at 1/8, 4 heads, STM encoder), counted in their code.
AUTHORS_PAPER_PARAMS = 43_261_825
JAXVOL_PAPER_PARAMS = 54_454_657  # jaxvol's own layout, same config fields


def _to_ours(x):
  return jnp.asarray(np.moveaxis(np.asarray(x, np.float32), 1, -1))


@pytest.fixture(scope="module")
def fixture():
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


def _close(got, ref):
  ref = np.asarray(ref)
  err = np.abs(np.asarray(got) - ref)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
  return float(err.max())


def test_converter_reads_the_architecture(fixture):
  fields, net = fixture["fields"], fixture["net"]
  assert fields["channel_mults"] == (1, 2, 2) and fields["num_res_blocks"] == 1
  assert fields["attention_levels"] == (2,) and fields["time_embed_dim"] == 32
  assert net.layout == "authors" and net.stm and fields["in_channels"] == 2
  count = sum(np.size(x) for x in jax.tree.leaves(fixture["variables"]))
  assert count == int(fixture["f"]["num_params"])
  convert_sparse._shape_check(fixture["variables"], net, 2, 1)  # pylint: disable=protected-access
  bad = dict(fixture["state_dict"])
  bad["stray.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match="stray.weight"):
    convert_sparse.convert_torch_state_dict(bad, net)
  del bad["stray.weight"], bad["out.2.weight"]
  with pytest.raises(ValueError, match="out.2.weight"):
    convert_sparse.convert_torch_state_dict(bad, net)


def test_forward_matches_their_unet(fixture):
  f, net, v = fixture["f"], fixture["net"], fixture["variables"]
  x_t = jnp.concatenate([fixture["x_T"], fixture["cond"]])
  low = jnp.concatenate([fixture["cond"], fixture["x_T"]])
  encoder = stm.StructureEncoder(net.stm_dim, layout="authors")
  _close(encoder.apply({"params": v["params"]["stm_encoder"]}, low), f["stm_code"])
  out = jax.jit(lambda v, x, y, t: net.apply(v, jnp.concatenate([x, y], -1), t, structure=y))(
      v, x_t, low, jnp.asarray(f["forward_t"]))
  err = _close(out[:, ::3, ::3, ::3], _to_ours(f["forward_out_sub3"]))
  np.testing.assert_allclose(np.mean(out, axis=(1, 2, 3, 4)), f["forward_out_mean"], rtol=1e-4,
                             atol=1e-6)
  assert err < 1e-4


def test_sampler_matches_theirs(fixture):
  f, net, v, cond = fixture["f"], fixture["net"], fixture["variables"], fixture["cond"]
  d = gaussian.GaussianDiffusion(1000, 1e-4, 0.02, "x0")
  ts = sparse.sparse_timesteps(1000, int(f["f_steps"]), "arange")
  assert ts.tolist() == [0, 199, 399, 599, 799, 999]
  calls = []

  def denoise(x, t):
    calls.append(1)  # traced once per evaluation site
    return net.apply(v, jnp.concatenate([x, cond], -1), t, structure=cond)

  out = jax.jit(lambda x: sparse.authors_sample(d, denoise, x, ts, clip_x0=1.0))(fixture["x_T"])
  assert sparse.nfe(ts, sampler="authors") == 11
  assert len(calls) == 2 + 1 + 2  # scanned corrected move (2), move to 0 (1), 0 -> -1 (2)
  _close(out[:, ::2, ::2, ::2], _to_ours(f["sample_out_sub2"]))
  np.testing.assert_allclose(np.mean(out), f["sample_out_mean"], rtol=1e-4, atol=1e-6)


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


def test_command_line_converts_a_state_dict(fixture, tmp_path, capsys):
  from flax import serialization  # pylint: disable=import-outside-toplevel
  src = tmp_path / "model000010.npz"
  np.savez(src, **{f"module.{k}": v for k, v in fixture["state_dict"].items()})  # DDP prefixes
  out = tmp_path / "sparse.msgpack"
  assert convert_sparse.main([str(src), str(out), "--num_heads", "2", "--groups", "4"]) == 0
  assert "layout='authors'" in capsys.readouterr().out
  restored = serialization.msgpack_restore(out.read_bytes())
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(fixture["variables"])):
    np.testing.assert_array_equal(a, b)
  assert convert_sparse.main([str(src), str(tmp_path / "w.npz"), "--num_heads", "2"]) == 0
  assert "params/stm_encoder/coronal0/kernel" in np.load(tmp_path / "w.npz").files
  assert convert_sparse.main([str(tmp_path / "missing.npz"), str(tmp_path / "x.npz")]) == 1
  with pytest.raises(SystemExit):
    convert_sparse.main([str(src), str(tmp_path / "w.txt")])
