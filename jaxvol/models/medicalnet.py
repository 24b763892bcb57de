"""MedicalNet 3D ResNets as frozen feature extractors, and the loader for their released weights.

MedicalNet is the 3D ResNet family of Chen, Ma and Zheng, "Med3D: Transfer Learning for 3D
Medical Image Analysis" (arXiv:1904.00625, 2019), pre-trained for segmentation on a collection
of public 3D CT and MRI data sets. 3D generation papers (PRDiT among them) report 3D FID and MMD
on the global-average-pooled output of its last stage: 2048 features for ResNet-50. The
evaluation code is jaxvol.eval.generation.

The network follows the released models rather than the 2D ResNet:
  * stem: 7^3 convolution, stride 2, 64 channels, no bias; BatchNorm; ReLU; 3^3 max pool, stride 2,
    padding 1;
  * four stages of BasicBlocks (ResNet-10/18/34) or Bottlenecks (expansion 4; ResNet-50 and
    deeper). Stage 2 has stride 2; stages 3 and 4 keep stride 1 and dilate their 3^3 convolutions
    by 2 and 4 instead, so the output is 1/8 of the input size. In a Bottleneck the stride sits
    on the 3^3 convolution; every block of a stage, the first included, uses the stage's
    dilation, and a 3^3 convolution pads by its dilation;
  * the first block of a stage gets a projection shortcut when the stride or width changes:
    type 'B' is a 1^3 convolution and BatchNorm, type 'A' subsamples and zero-pads the channels
    (parameter-free). The released ResNet-18 and ResNet-34 use 'A', all others 'B';
  * BatchNorm always uses its running statistics (epsilon 1e-5, PyTorch's default): the network
    is only ever evaluated here. The segmentation head (``conv_seg``) is not built.

Layout is NDHWC. Flax module names mirror the PyTorch names with '.' before an index turned into
'_' (``layer1.0.downsample.1`` is ``layer1_0/downsample_1``), so the conversion is a renaming
plus the OIDHW -> DHWIO kernel transpose.
"""

from __future__ import annotations

import os
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "DEPTHS",
    "BasicBlock",
    "Bottleneck",
    "MedicalNetResNet",
    "resnet",
    "init_variables",
    "feature_dim",
    "describe",
    "model_from_variables",
    "convert_torch_state_dict",
    "to_torch_state_dict",
    "load_medicalnet",
]

# depth -> (bottleneck blocks?, blocks per stage), as in the released MedicalNet models.
DEPTHS = {
    10: (False, (1, 1, 1, 1)),
    18: (False, (2, 2, 2, 2)),
    34: (False, (3, 4, 6, 3)),
    50: (True, (3, 4, 6, 3)),
    101: (True, (3, 4, 23, 3)),
    152: (True, (3, 8, 36, 3)),
    200: (True, (3, 24, 36, 3)),
}
_STAGE_STRIDES = (1, 2, 1, 1)
_STAGE_DILATIONS = (1, 1, 2, 4)
_BN_EPSILON = 1e-5
# PyTorch keys of heads that the feature extractor drops: MedicalNet's segmentation head, and the
# classifier of the 3D-ResNets code MedicalNet derives from.
_HEAD_PREFIXES = ("conv_seg.", "fc.")
# MedicalNet's initialisation: He normal with fan_out.
_KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(features: int, kernel: int, stride: int, dilation: int, precision, name: str):
  """A bias-free 3D convolution padded like PyTorch's (dilation * (kernel - 1) / 2 each side).

  Explicit padding rather than 'SAME': with stride 2 and an even size, 'SAME' would pad only the
  far side and shift every output voxel by half a step relative to the PyTorch model.
  """
  pad = dilation * (kernel - 1) // 2
  return nn.Conv(features, (kernel,) * 3, strides=(stride,) * 3, padding=[(pad, pad)] * 3,
                 kernel_dilation=(dilation,) * 3, use_bias=False, kernel_init=_KAIMING_FAN_OUT,
                 precision=precision, name=name)


def _bn(name: str):
  return nn.BatchNorm(use_running_average=True, epsilon=_BN_EPSILON, name=name)


def _shortcut(x, out_channels: int, stride: int, kind: str | None, precision):
  """The residual branch of a block: identity, type 'A' (zero-pad) or type 'B' (projection)."""
  if kind is None:
    return x
  if kind == "A":
    # A stride-s average pool with a 1^3 window is plain subsampling.
    x = x[:, ::stride, ::stride, ::stride, :]
    return jnp.pad(x, [(0, 0)] * 4 + [(0, out_channels - x.shape[-1])])
  if kind == "B":
    x = _conv(out_channels, 1, stride, 1, precision, "downsample_0")(x)
    return _bn("downsample_1")(x)
  raise ValueError(f"unknown shortcut type {kind!r}; expected 'A' or 'B'")


class BasicBlock(nn.Module):
  """Two 3^3 convolutions with BatchNorm, both dilated; the first carries the stride."""

  planes: int
  stride: int = 1
  dilation: int = 1
  shortcut: str | None = None
  precision: Any = None

  expansion = 1

  @nn.compact
  def __call__(self, x):
    h = _conv(self.planes, 3, self.stride, self.dilation, self.precision, "conv1")(x)
    h = nn.relu(_bn("bn1")(h))
    h = _conv(self.planes, 3, 1, self.dilation, self.precision, "conv2")(h)
    h = _bn("bn2")(h)
    return nn.relu(h + _shortcut(x, self.planes, self.stride, self.shortcut, self.precision))


class Bottleneck(nn.Module):
  """1^3 reduce, dilated 3^3 (with the stride), 1^3 expand to 4 * planes; BatchNorm after each."""

  planes: int
  stride: int = 1
  dilation: int = 1
  shortcut: str | None = None
  precision: Any = None

  expansion = 4

  @nn.compact
  def __call__(self, x):
    out_channels = self.planes * self.expansion
    h = nn.relu(_bn("bn1")(_conv(self.planes, 1, 1, 1, self.precision, "conv1")(x)))
    h = _conv(self.planes, 3, self.stride, self.dilation, self.precision, "conv2")(h)
    h = nn.relu(_bn("bn2")(h))
    h = _bn("bn3")(_conv(out_channels, 1, 1, 1, self.precision, "conv3")(h))
    return nn.relu(h + _shortcut(x, out_channels, self.stride, self.shortcut, self.precision))


class MedicalNetResNet(nn.Module):
  """MedicalNet 3D ResNet trunk: (N, D, H, W, C) volumes -> (N, F) pooled last-stage features.

  Attributes:
    stage_sizes: blocks in each of the four stages.
    bottleneck: Bottleneck blocks (expansion 4) if true, else BasicBlocks.
    width: channels of the stem; stage i has width * 2^i planes. MedicalNet uses 64; smaller
      widths only serve fast tests.
    shortcut: 'A' or 'B' (module docstring).
    precision: matmul precision of the convolutions. 'highest' keeps float32 accumulation on
      accelerators whose default is TF32, so features (and the FID built on them) do not depend on
      the device.
  """

  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  bottleneck: bool = True
  width: int = 64
  shortcut: str = "B"
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x):
    if x.ndim != 5:
      raise ValueError(f"expected (N, D, H, W, C) volumes, got shape {x.shape}")
    x = _conv(self.width, 7, 2, 1, self.precision, "conv1")(x)
    x = nn.relu(_bn("bn1")(x))
    x = nn.max_pool(x, (3, 3, 3), strides=(2, 2, 2), padding=[(1, 1)] * 3)
    block = Bottleneck if self.bottleneck else BasicBlock
    channels = self.width
    for i, blocks in enumerate(self.stage_sizes):
      planes = self.width * 2**i
      for j in range(blocks):
        stride = _STAGE_STRIDES[i] if j == 0 else 1
        changes = stride != 1 or channels != planes * block.expansion
        x = block(planes, stride, _STAGE_DILATIONS[i], self.shortcut if changes else None,
                  self.precision, name=f"layer{i + 1}_{j}")(x)
        channels = planes * block.expansion
    return jnp.mean(x, axis=(1, 2, 3))


def resnet(depth: int = 50, width: int = 64, shortcut: str | None = None,
           precision: Any = "highest") -> MedicalNetResNet:
  """The MedicalNet ResNet of a given depth (10, 18, 34, 50, 101, 152 or 200).

  Args:
    depth: network depth; a key of DEPTHS.
    width: stem channels (64 in MedicalNet).
    shortcut: 'A' or 'B'; None picks the released models' choice ('A' for 18 and 34).
    precision: convolution precision (see MedicalNetResNet).

  Returns:
    An unbound MedicalNetResNet.
  """
  if depth not in DEPTHS:
    raise ValueError(f"unknown MedicalNet depth {depth}; expected one of {sorted(DEPTHS)}")
  bottleneck, stage_sizes = DEPTHS[depth]
  if shortcut is None:
    shortcut = "A" if depth in (18, 34) else "B"
  return MedicalNetResNet(stage_sizes=stage_sizes, bottleneck=bottleneck, width=width,
                          shortcut=shortcut, precision=precision)


def feature_dim(model: MedicalNetResNet) -> int:
  """Length of the pooled feature vector: 8 * width, times 4 for Bottleneck networks."""
  return model.width * 8 * (Bottleneck.expansion if model.bottleneck else BasicBlock.expansion)


def describe(model: MedicalNetResNet) -> str:
  """A readable name: 'MedicalNet ResNet-50', with the width when it is not MedicalNet's 64."""
  depth = next((d for d, (bottleneck, sizes) in DEPTHS.items()
                if bottleneck == model.bottleneck and sizes == tuple(model.stage_sizes)), None)
  text = f"MedicalNet ResNet-{depth}" if depth else f"MedicalNet ResNet{tuple(model.stage_sizes)}"
  return text if model.width == 64 else f"{text} (width {model.width})"


def init_variables(model: MedicalNetResNet, seed: int = 0) -> dict:
  """Randomly initialised {'params', 'batch_stats'}: He fan-out kernels, identity BatchNorm.

  The same distribution as ``model.init`` (and MedicalNet's own initialisation), drawn with
  numpy: JAX's counter-based generator takes tens of seconds on CPU for ResNet-50's 46M weights.

  Args:
    model: the network.
    seed: seed of the numpy generator.

  Returns:
    The variables as a nested dict of float32 numpy arrays.
  """
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 16, 1)))

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      fan_out = int(np.prod(leaf.shape[:-2])) * leaf.shape[-1]
      return rng.standard_normal(leaf.shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_out))
    return (np.ones if name in ("scale", "var") else np.zeros)(leaf.shape, np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def model_from_variables(variables, precision: Any = "highest") -> MedicalNetResNet:
  """The network whose structure the variables describe (stage sizes, block, width, shortcut).

  Args:
    variables: {'params': ..., 'batch_stats': ...} as made by init_variables or
      convert_torch_state_dict.
    precision: convolution precision of the returned model.

  Returns:
    An unbound MedicalNetResNet.
  """
  params = variables["params"]
  if "conv1" not in params or "layer1_0" not in params:
    raise ValueError("variables do not look like a MedicalNet ResNet (no conv1 / layer1_0)")
  counts = []
  for stage in range(1, 5):
    n = 0
    while f"layer{stage}_{n}" in params:
      n += 1
    if n == 0:
      raise ValueError(f"variables have no blocks in stage layer{stage}")
    counts.append(n)
  bottleneck = "conv3" in params["layer1_0"]
  # Stage 2 always changes stride and width, so its first block has a projection iff type 'B'.
  shortcut = "B" if "downsample_0" in params["layer2_0"] else "A"
  return MedicalNetResNet(stage_sizes=tuple(counts), bottleneck=bottleneck,
                          width=int(params["conv1"]["kernel"].shape[-1]), shortcut=shortcut,
                          precision=precision)


def _flax_path(torch_modules: list[str]) -> list[str]:
  """['layer1', '0', 'downsample', '1'] -> ['layer1_0', 'downsample_1']."""
  path = []
  for part in torch_modules:
    if part.isdigit() and path:
      path[-1] = f"{path[-1]}_{part}"
    else:
      path.append(part)
  return path


def _set(tree: dict, path: list[str], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  if path[-1] in tree:
    raise ValueError(f"two PyTorch entries map to {'/'.join(path)}")
  tree[path[-1]] = value


def convert_torch_state_dict(state_dict) -> dict:
  """Converts a MedicalNet PyTorch state dict into Flax {'params', 'batch_stats'}.

  Accepts what MedicalNet releases: a dict with a 'state_dict' entry, keys prefixed by
  'module.' (saved from DataParallel). Values may be numpy arrays or CPU tensors. Convolution
  weights go from OIDHW to DHWIO; BatchNorm weight/bias/running_mean/running_var become
  params scale/bias and batch_stats mean/var. Segmentation or classification head entries
  (conv_seg.*, fc.*) and num_batches_tracked are dropped.

  Args:
    state_dict: mapping from PyTorch names to arrays.

  Returns:
    Nested dict {'params': ..., 'batch_stats': ...} of float32 numpy arrays.
  """
  if "state_dict" in state_dict and not hasattr(state_dict["state_dict"], "shape"):
    state_dict = state_dict["state_dict"]
  params: dict = {}
  stats: dict = {}
  for key, value in state_dict.items():
    name = key.removeprefix("module.")
    if name.startswith(_HEAD_PREFIXES) or name.endswith("num_batches_tracked"):
      continue
    value = np.asarray(value, dtype=np.float32)
    *modules, leaf = name.split(".")
    path = _flax_path(modules)
    if not path:
      raise ValueError(f"unexpected top-level entry {key!r}")
    if leaf == "weight" and value.ndim == 5:
      _set(params, path + ["kernel"], np.transpose(value, (2, 3, 4, 1, 0)))
    elif leaf == "weight" and value.ndim == 1:
      _set(params, path + ["scale"], value)
    elif leaf == "bias" and value.ndim == 1:
      # MedicalNet's trunk convolutions have no bias, so a bias belongs to a BatchNorm.
      _set(params, path + ["bias"], value)
    elif leaf == "running_mean":
      _set(stats, path + ["mean"], value)
    elif leaf == "running_var":
      _set(stats, path + ["var"], value)
    else:
      raise ValueError(f"unexpected entry {key!r} with shape {value.shape}")
  return {"params": params, "batch_stats": stats}


def to_torch_state_dict(variables) -> dict[str, np.ndarray]:
  """Inverse of convert_torch_state_dict: Flax variables -> PyTorch-named numpy arrays.

  Args:
    variables: {'params': ..., 'batch_stats': ...}.

  Returns:
    Flat dict in MedicalNet's naming (without the 'module.' prefix), kernels in OIDHW.
  """
  out = {}
  renames = {("params", "kernel"): "weight", ("params", "scale"): "weight",
             ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
             ("batch_stats", "var"): "running_var"}
  for collection in ("params", "batch_stats"):
    flat = jax.tree_util.tree_flatten_with_path(variables[collection])[0]
    for path, value in flat:
      keys = [p.key for p in path]
      value = np.asarray(value, dtype=np.float32)
      if keys[-1] == "kernel":
        value = np.transpose(value, (4, 3, 0, 1, 2))
      modules = [re.sub(r"_(\d+)$", r".\1", k) for k in keys[:-1]]
      out[".".join(modules + [renames[(collection, keys[-1])]])] = value
  return out


def _check_structure(model: MedicalNetResNet, variables) -> None:
  """Raises ValueError naming every missing, unexpected or mis-shaped entry."""
  expected = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 16, 1)))
  want = {jax.tree_util.keystr(p): v.shape
          for p, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
  have = {jax.tree_util.keystr(p): np.shape(v)
          for p, v in jax.tree_util.tree_flatten_with_path(variables)[0]}
  problems = [f"missing {k}" for k in sorted(want.keys() - have.keys())]
  problems += [f"unexpected {k}" for k in sorted(have.keys() - want.keys())]
  problems += [f"{k}: shape {have[k]}, expected {want[k]}"
               for k in sorted(want.keys() & have.keys()) if have[k] != want[k]]
  if problems:
    shown = 10  # Enough to recognise the pattern of a wrong file.
    raise ValueError(f"weights do not match a MedicalNet ResNet ({len(problems)} problems): "
                     + "; ".join(problems[:shown]))


def load_medicalnet(path) -> dict:
  """Loads MedicalNet weights as Flax variables from .pth, .npz or .msgpack.

  .pth files (MedicalNet's releases) need PyTorch; tools/convert_medicalnet.py turns one into
  .npz (PyTorch names) or .msgpack (Flax variables) once, so evaluation can run without it.
  The structure is checked against the network it implies, so a truncated or foreign file fails
  here rather than giving silently wrong features.

  Args:
    path: weights file.

  Returns:
    {'params': ..., 'batch_stats': ...}; model_from_variables gives the matching network.
  """
  path = os.fspath(path)
  suffix = os.path.splitext(path)[1].lower()
  if suffix in (".pth", ".pt", ".tar"):
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise ImportError(
          f"reading {path} needs PyTorch, which is not installed. Install torch, or convert the "
          "file once where torch is available: python tools/convert_medicalnet.py "
          f"{path} OUT.npz, then load OUT.npz") from None
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint)
    variables = convert_torch_state_dict({k: v.detach().numpy() for k, v in state.items()})
  elif suffix == ".npz":
    with np.load(path) as data:
      variables = convert_torch_state_dict({k: data[k] for k in data.files})
  elif suffix == ".msgpack":
    from flax import serialization  # pylint: disable=import-outside-toplevel
    with open(path, "rb") as f:
      variables = serialization.msgpack_restore(f.read())
  else:
    raise ValueError(f"{path}: expected a .pth, .npz or .msgpack MedicalNet weights file")
  _check_structure(model_from_variables(variables), variables)
  return variables
