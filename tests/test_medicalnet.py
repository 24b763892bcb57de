"""Tests for jaxvol.models.medicalnet: weight conversion, loading, and the port against PyTorch."""

import sys

import jax
import numpy as np
import pytest
from flax import serialization

from conftest import ROOT
from conftest import load_module
from jaxvol.models import medicalnet


def _load_tool():
  return load_module(ROOT / "tools" / "convert_medicalnet.py", "convert_medicalnet_under_test")


def _random_variables(model, seed=0):
  """init_variables with non-trivial BatchNorm, so a swapped scale/bias or mean/var shows."""
  rng = np.random.default_rng(seed + 100)
  variables = medicalnet.init_variables(model, seed)

  def perturb(path, leaf):
    if path[-1].key in ("kernel",):
      return leaf
    if path[-1].key in ("scale", "var"):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return rng.normal(0.0, 0.1, leaf.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(perturb, variables)


def _assert_same(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("depth", [18, 50])
def test_round_trip_through_pytorch_names(depth):
  model = medicalnet.resnet(depth, width=8)
  variables = _random_variables(model)
  state = medicalnet.to_torch_state_dict(variables)
  # Names and layouts of MedicalNet's checkpoints.
  assert state["conv1.weight"].shape == (8, 1, 7, 7, 7)
  assert "bn1.running_var" in state and "layer4.0.bn2.weight" in state
  assert ("layer2.0.downsample.0.weight" in state) == (depth == 50)  # ResNet-18 uses type 'A'.
  # Wrapped like the released files: DataParallel prefix, head and BatchNorm counters.
  released = {f"module.{k}": v for k, v in state.items()}
  released["module.conv_seg.0.weight"] = np.zeros((2, 8, 3, 3, 3), np.float32)
  released["module.bn1.num_batches_tracked"] = np.array(7)
  back = medicalnet.convert_torch_state_dict({"state_dict": released})
  _assert_same(back, variables)
  assert medicalnet.model_from_variables(back) == model


@pytest.mark.parametrize("depth, dim", [(10, 64), (18, 64), (34, 64), (50, 256)])
def test_model_from_variables_and_feature_dim(depth, dim):
  model = medicalnet.resnet(depth, width=8)
  assert medicalnet.model_from_variables(medicalnet.init_variables(model)) == model
  assert medicalnet.feature_dim(model) == dim
  assert medicalnet.describe(model) == f"MedicalNet ResNet-{depth} (width 8)"


def test_tool_converts_npz_and_loader_reads_both_formats(tmp_path):
  model = medicalnet.resnet(50, width=4)
  variables = _random_variables(model)
  source = tmp_path / "resnet_50.npz"
  state = medicalnet.to_torch_state_dict(variables)
  np.savez(source, **{f"module.{k}": v for k, v in state.items()})
  tool = _load_tool()
  for out in ("converted.msgpack", "converted.npz"):
    assert tool.main([str(source), str(tmp_path / out)]) == 0
    _assert_same(medicalnet.load_medicalnet(tmp_path / out), variables)
  with open(tmp_path / "converted.msgpack", "rb") as f:
    assert "params" in serialization.msgpack_restore(f.read())


def test_loader_rejects_incomplete_weights(tmp_path):
  state = medicalnet.to_torch_state_dict(medicalnet.init_variables(medicalnet.resnet(50, width=4)))
  del state["layer3.2.bn2.running_var"]
  np.savez(tmp_path / "bad.npz", **state)
  with pytest.raises(ValueError, match="missing .*layer3_2.*bn2.*var"):
    medicalnet.load_medicalnet(tmp_path / "bad.npz")


def test_pth_without_torch_names_the_converter(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "torch", None)  # Makes `import torch` fail.
  with pytest.raises(ImportError, match="convert_medicalnet.py"):
    medicalnet.load_medicalnet(tmp_path / "resnet_50.pth")


def test_pth_release_layout_loads_with_torch(tmp_path):
  torch = pytest.importorskip("torch", reason="PyTorch is not installed; .pth reading needs it")
  variables = _random_variables(medicalnet.resnet(50, width=4))
  state = {f"module.{k}": torch.from_numpy(v)
           for k, v in medicalnet.to_torch_state_dict(variables).items()}
  torch.save({"epoch": 1, "state_dict": state}, tmp_path / "resnet_50.pth")
  _assert_same(medicalnet.load_medicalnet(tmp_path / "resnet_50.pth"), variables)


def _torch_medicalnet(depth):
  """MedicalNet's ResNet written in PyTorch from the Med3D description, with random weights."""
  import torch  # pylint: disable=import-outside-toplevel
  from torch import nn  # pylint: disable=import-outside-toplevel

  bottleneck, stage_sizes = medicalnet.DEPTHS[depth]
  kind = "A" if depth in (18, 34) else "B"
  expansion = 4 if bottleneck else 1

  def conv(cin, cout, k, stride=1, dilation=1):
    return nn.Conv3d(cin, cout, k, stride=stride, padding=dilation * (k // 2),
                     dilation=dilation, bias=False)

  class Block(nn.Module):

    def __init__(self, cin, planes, stride, dilation, shortcut):
      super().__init__()
      cout = planes * expansion
      if bottleneck:
        self.conv1, self.bn1 = conv(cin, planes, 1), nn.BatchNorm3d(planes)
        self.conv2 = conv(planes, planes, 3, stride, dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3, self.bn3 = conv(planes, cout, 1), nn.BatchNorm3d(cout)
        self.convs = [(self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)]
      else:
        self.conv1 = conv(cin, planes, 3, stride, dilation)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2, self.bn2 = conv(planes, planes, 3, 1, dilation), nn.BatchNorm3d(planes)
        self.convs = [(self.conv1, self.bn1), (self.conv2, self.bn2)]
      if shortcut == "B":
        self.downsample = nn.Sequential(conv(cin, cout, 1, stride), nn.BatchNorm3d(cout))
      self.shortcut, self.stride, self.cout = shortcut, stride, cout

    def forward(self, x):
      h = x
      for i, (c, bn) in enumerate(self.convs):
        h = bn(c(h))
        if i < len(self.convs) - 1:
          h = torch.relu(h)
      if self.shortcut == "B":
        x = self.downsample(x)
      elif self.shortcut == "A":
        x = x[:, :, ::self.stride, ::self.stride, ::self.stride]
        x = torch.cat([x, x.new_zeros((x.shape[0], self.cout - x.shape[1]) + x.shape[2:])], 1)
      return torch.relu(h + x)

  class Net(nn.Module):

    def __init__(self):
      super().__init__()
      self.conv1 = nn.Conv3d(1, 64, 7, stride=2, padding=3, bias=False)
      self.bn1 = nn.BatchNorm3d(64)
      self.pool = nn.MaxPool3d(3, stride=2, padding=1)
      cin = 64
      for i, (n, stride, dilation) in enumerate(zip(stage_sizes, (1, 2, 1, 1), (1, 1, 2, 4))):
        planes, blocks = 64 * 2**i, []
        for j in range(n):
          s = stride if j == 0 else 1
          changes = s != 1 or cin != planes * expansion
          blocks.append(Block(cin, planes, s, dilation, kind if changes else None))
          cin = planes * expansion
        setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))

    def forward(self, x):
      x = self.pool(torch.relu(self.bn1(self.conv1(x))))
      for i in range(1, 5):
        x = getattr(self, f"layer{i}")(x)
      return x.mean(dim=(2, 3, 4))

  torch.manual_seed(depth)
  net = Net()
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, nn.BatchNorm3d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0.0, 0.1)
        m.running_mean.normal_(0.0, 0.1)
        m.running_var.uniform_(0.5, 1.5)
  return net.eval()


@pytest.mark.parametrize("depth", [10, 18, 50])
def test_port_matches_pytorch(depth):
  torch = pytest.importorskip("torch", reason="PyTorch is not installed; the port check needs it")
  net = _torch_medicalnet(depth)
  variables = medicalnet.convert_torch_state_dict(
      {k: v.numpy() for k, v in net.state_dict().items()})
  x = np.random.default_rng(0).normal(size=(2, 16, 16, 16, 1)).astype(np.float32)
  with torch.no_grad():
    want = net(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)))).numpy()
  model = medicalnet.model_from_variables(variables)
  got = np.asarray(jax.jit(model.apply)(variables, x))
  assert got.shape == (2, medicalnet.feature_dim(model))
  err = np.max(np.abs(got - want))
  print(f"ResNet-{depth}: max |jax - torch| = {err:.2e}, max |feature| = {np.abs(want).max():.2e}")
  np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, np.abs(want).max()), rtol=1e-4)
