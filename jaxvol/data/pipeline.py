"""Grain input pipeline: random paired crops from a converted store, batched per host.

The pipeline is::

  source (subjects of one split)
    .shuffle(seed)           new permutation every epoch
    .repeat(None)            endless
    .random_map(crop, seed)  one random box + flips per element, same for every modality
    .batch(batch_size // process_count, drop_remainder=True)
    [process_index::process_count]
    .to_iter_dataset()
    .mp_prefetch(workers)    only when num_workers > 0

With `crops="grid"` (the sparse-diffusion authors' loader, mirthAI/sparse-3d-diffusion) the
source is instead every patch of a fixed grid over each subject (50% overlap, see `grid_starts`),
the shuffle permutes the patches, and the map reads the patch (no randomness, no flips):

  source (subject, corner) of every grid patch of the split
    .shuffle(seed).repeat(None).map(read)   then batched and sliced as above

With `crops="whole"` every element is the WHOLE training region of one subject (the whole
volume without a region), read from its start and edge-padded at its end up to `crop_size` (the
region padded to the method's spatial multiple: `whole_crop_size`), as the samplers pad a volume
they predict in one pass; flips as with random crops:

  source (subjects of one split)
    .shuffle(seed).repeat(None).random_map(whole region + flips)   then batched as above

Crops are drawn and grouped into per-host blocks BEFORE the per-host slice (our choice; Grain's
usual recipe slices elements first): Grain derives each element's random generator from (seed,
element index), and host p's k-th batch is block k * process_count + p, i.e. rows
[p * b, (p + 1) * b) of the single-host batch k (b = batch_size // process_count). Concatenated in
host order, the hosts' batches are the single-host batch row for row, so the global batch of a
step (and the noise each row draws) is the same whatever the number of hosts, and hosts never
share crop positions. Every host's iterator stands at the same position (the number of global
batches drawn), so its state is valid on any number of hosts. Grain's per-element generators also
make the batches independent of the number of worker processes, and the iterator's
`get_state()`/`set_state()` (or `grain.checkpoint`) resume at exactly the next batch.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import grain
import numpy as np

from jaxvol.data.store import Store

PAD_VALUE = -1.0  # The bottom of the network range: air for CT, background for PET/MRI presets.


def region_box(shape: Sequence[int],
               region: Mapping[int | str, Sequence[float]] | None) -> tuple[tuple[int, int], ...]:
  """Voxel box of a region given as fractions of the volume along some axes.

  Args:
    shape: the volume's 3D shape.
    region: {axis: (lo_frac, hi_frac)} with 0 <= lo < hi <= 1, e.g. {0: (0.0, 0.5)} for the first
      half along axis 0 (the left hemisphere of a RAS volume). Axes not named are whole; None means
      the whole volume. Keys may be strings (as configs loaded from JSON give them).

  Returns:
    3 (start, stop) pairs; bounds are rounded, so complementary regions ((0, .5) and (.5, 1)) tile
    the axis without overlap.
  """
  box = [(0, int(s)) for s in shape]
  if len(box) != 3:
    raise ValueError(f"shape must be 3D, got {tuple(shape)}")
  for axis, fracs in (region or {}).items():
    axis = int(axis)
    if axis not in (0, 1, 2):
      raise ValueError(f"region axis must be 0, 1 or 2, got {axis}")
    lo, hi = (float(f) for f in fracs)
    if not 0.0 <= lo < hi <= 1.0:
      raise ValueError(f"region for axis {axis} must satisfy 0 <= lo < hi <= 1, got ({lo}, {hi})")
    n = box[axis][1]
    start, stop = int(round(lo * n)), int(round(hi * n))
    if stop <= start:
      raise ValueError(f"region ({lo}, {hi}) of axis {axis} (length {n}) holds no voxel")
    box[axis] = (start, stop)
  return tuple(box)


def regions_overlap(a: Mapping[int | str, Sequence[float]] | None,
                    b: Mapping[int | str, Sequence[float]] | None) -> bool:
  """Whether two regions (as `region_box` takes them; None = whole) share any part of a volume:
  they are disjoint only if, on some axis, their fraction intervals do not overlap."""
  a = {int(k): tuple(float(f) for f in v) for k, v in (a or {}).items()}
  b = {int(k): tuple(float(f) for f in v) for k, v in (b or {}).items()}
  for axis in (0, 1, 2):
    (alo, ahi), (blo, bhi) = a.get(axis, (0.0, 1.0)), b.get(axis, (0.0, 1.0))
    if ahi <= blo or bhi <= alo:
      return False
  return True


CROP_MODES = ("random", "grid", "whole")


def grid_starts(lo: int, hi: int, size: int, stride: int) -> list[int]:
  """Patch corners along one axis of [lo, hi): every `stride` from lo, plus one ending at hi.

  The sparse-diffusion authors' grid: starts lo, lo + stride, ... while the patch fits, and when
  the last one stops short of hi, one more at hi - size. An axis shorter than the patch has the
  single start lo (the patch is then padded at its far end).
  """
  n = hi - lo
  if size <= 0 or stride <= 0:
    raise ValueError(f"patch size and stride must be positive, got {size}, {stride}")
  starts = list(range(lo, lo + max(n - size + 1, 1), stride))
  if starts[-1] + size < hi:
    starts.append(hi - size)
  return starts


class GridSource(grain.sources.RandomAccessDataSource):
  """Every patch of a 50%-overlap grid over the subjects of one split (or a region of each).

  An element is {"subject": id, "index": subject index, "start": (3,) int corner}.
  """

  def __init__(self, store: Store | str, split: str, crop_size: Sequence[int],
               region: Mapping[int, Sequence[float]] | None = None):
    self.store = store if isinstance(store, Store) else Store(store)
    self.split = split
    self.crop_size = tuple(int(c) for c in crop_size)
    stride = tuple(max(1, c // 2) for c in self.crop_size)
    self.subject_ids = [s["id"] for s in self.store.subjects(split)]
    if not self.subject_ids:
      raise ValueError(f"{self.store.path}: split {split!r} has no subjects")
    self.patches = []
    for index, sid in enumerate(self.subject_ids):
      box = region_box(self.store.shape(sid), region)
      axes = [grid_starts(lo, hi, c, st) for (lo, hi), c, st in zip(box, self.crop_size, stride)]
      self.patches += [(index, (a, b, c)) for a in axes[0] for b in axes[1] for c in axes[2]]

  def __len__(self) -> int:
    return len(self.patches)

  def __getitem__(self, index: int) -> dict[str, Any]:
    subject, start = self.patches[int(index)]
    return {"subject": self.subject_ids[subject], "index": subject,
            "start": np.asarray(start, np.int64)}

  def __repr__(self) -> str:
    return (f"GridSource(store={self.store.path!r}, split={self.split!r}, "
            f"crop={self.crop_size}, n={len(self)})")


class CropSource(grain.sources.RandomAccessDataSource):
  """The subjects of one split of a store; an element is {"subject": id, "index": i}."""

  def __init__(self, store: Store | str, split: str):
    self.store = store if isinstance(store, Store) else Store(store)
    self.split = split
    self.subject_ids = [s["id"] for s in self.store.subjects(split)]
    if not self.subject_ids:
      raise ValueError(f"{self.store.path}: split {split!r} has no subjects")

  def __len__(self) -> int:
    return len(self.subject_ids)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    return {"subject": self.subject_ids[index], "index": index}

  def __repr__(self) -> str:
    return f"CropSource(store={self.store.path!r}, split={self.split!r}, n={len(self)})"


AXES = (0, 1, 2)


def position_axes(data_config) -> tuple[int, ...]:
  """The axes a data config encodes as position channels; () without position channels.

  Args:
    data_config: `config.data`; reads `position_channels` and `position_axes` (absent: all three
      axes, the behaviour of configs written before the field existed).

  Returns:
    The sorted axes whose channel holds coordinates (see `position_grid`).
  """
  if not data_config.get("position_channels", False):
    return ()
  axes = data_config.get("position_axes", None)
  axes = AXES if axes is None else tuple(int(a) for a in axes)
  if not axes or len(set(axes)) != len(axes) or any(a not in AXES for a in axes):
    raise ValueError(f"position_axes must be distinct axes from {AXES}, at least one, got "
                     f"{tuple(axes)} (set position_channels = False for none)")
  return tuple(sorted(axes))


def _region_fractions(region) -> dict[int, tuple[float, float]]:
  """{axis: (lo, hi)} of every axis; axes a region does not name (or None) are (0, 1)."""
  out = {a: (0.0, 1.0) for a in AXES}
  for axis, fracs in (region or {}).items():
    axis = int(axis)
    if axis not in AXES:
      raise ValueError(f"region axis must be 0, 1 or 2, got {axis}")
    lo, hi = (float(f) for f in fracs)
    if not 0.0 <= lo < hi <= 1.0:
      raise ValueError(f"region for axis {axis} must satisfy 0 <= lo < hi <= 1, got ({lo}, {hi})")
    out[axis] = (lo, hi)
  return out


def check_position_coverage(train_region, eval_region, axes: Sequence[int]) -> None:
  """Refuses position channels whose evaluation coordinates were never seen in training.

  A position channel holds a voxel's normalised coordinate in the whole volume, so training on
  one slab of an axis and evaluating on another (e.g. one hemisphere and the other along RAS x)
  hands the network values of that channel it was never trained on. Encode only the axes whose
  evaluation range lies inside the training range (config.data.position_axes), or split on an
  axis without a position channel.

  Args:
    train_region: the training region ({axis: (lo_frac, hi_frac)}, see `region_box`; None for the
      whole volume).
    eval_region: the evaluated region, same form (None: the whole volume).
    axes: the axes with position channels (`position_axes`; () checks nothing).

  Raises:
    ValueError: naming every encoded axis whose evaluation fractions leave the training ones.
  """
  train, evaluate = _region_fractions(train_region), _region_fractions(eval_region)
  bad = [(a, evaluate[a], train[a]) for a in sorted(int(a) for a in axes)
         if evaluate[a][0] < train[a][0] or evaluate[a][1] > train[a][1]]
  if bad:
    covered = [a for a in AXES
               if train[a][0] <= evaluate[a][0] and evaluate[a][1] <= train[a][1]]
    raise ValueError(
        "position channels evaluated outside the coordinates they were trained on: "
        + ", ".join(f"axis {a} evaluated on {e} but trained on {t}" for a, e, t in bad)
        + f"; encode only the covered axes (config.data.position_axes = {tuple(covered)}) or "
        "split the regions along an axis without a position channel")


def position_grid(shape: Sequence[int], box: Sequence[Sequence[int]] | None = None,
                  axes: Sequence[int] = AXES) -> np.ndarray:
  """Normalised voxel positions (D, H, W, 3) of a box of a volume of `shape`.

  Voxel centres of the whole volume map to [-1, 1] per axis ((2 i + 1) / n - 1), so a voxel has
  the same code in a training crop and in a whole-volume or other-region evaluation. Box bounds
  may lie outside [0, n) (crops of padded axes): positions extrapolate linearly. The channel of
  an axis not in `axes` is 0 everywhere: a constant zero input adds nothing to the network's
  first (zero-padded) convolution, so the network sees only the encoded axes, with the channel
  count of a full position code.
  """
  box = tuple((0, int(n)) for n in shape) if box is None else box
  keep = {int(a) for a in axes}
  coords = [((2.0 * np.arange(lo, hi) + 1.0) / n - 1.0).astype(np.float32)
            for (lo, hi), n in zip(box, shape)]
  grid = np.stack(np.meshgrid(*coords, indexing="ij"), axis=-1)
  for a in AXES:
    if a not in keep:
      grid[..., a] = 0.0
  return grid


def _axes_of(positions: bool | Sequence[int]) -> tuple[int, ...]:
  """`positions` of the crop maps and the iterator: False, True (every axis) or some axes."""
  if isinstance(positions, (bool, np.bool_)):
    return AXES if positions else ()
  axes = tuple(int(a) for a in positions)
  if len(set(axes)) != len(axes) or any(a not in AXES for a in axes):
    raise ValueError(f"position axes must be distinct axes from {AXES}, got {axes}")
  return axes


class CropAndFlip:
  """Random crop (same box for all modalities) + random flips; a picklable Grain random map.

  The crop corner is uniform over the positions that keep the crop inside the volume (or inside
  `region`). Along an axis shorter than the crop, the whole extent is read and centred in the
  crop, and the rest is filled with PAD_VALUE (-1, the minimum of the network range).
  """

  def __init__(self, store: Store, modalities: Mapping[str, str], crop_size: Sequence[int],
               flips: bool = True, region: Mapping[int, Sequence[float]] | None = None,
               with_meta: bool = False, positions: bool | Sequence[int] = False):
    self.store = store
    self.positions = _axes_of(positions)
    self.modalities = dict(modalities)
    self.crop_size = tuple(int(c) for c in crop_size)
    self.flips = bool(flips)
    self.region = None if region is None else {int(k): tuple(v) for k, v in region.items()}
    self.with_meta = with_meta

  def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    sid = record["subject"]
    box = region_box(self.store.shape(sid), self.region)
    read_box, offsets = [], []
    for (lo, hi), c in zip(box, self.crop_size):
      n = hi - lo
      if n >= c:
        start = lo + int(rng.integers(0, n - c + 1))
        read_box.append((start, start + c))
        offsets.append(0)
      else:
        read_box.append((lo, hi))
        offsets.append((c - n) // 2)
    flip_axes = [a for a, f in enumerate(rng.random(3) < 0.5) if f] if self.flips else []
    out = {}
    for key, modality in self.modalities.items():
      x = self.store.read(sid, modality, read_box)
      if x.shape != self.crop_size:
        padded = np.full(self.crop_size, PAD_VALUE, dtype=np.float32)
        padded[tuple(slice(o, o + s) for o, s in zip(offsets, x.shape))] = x
        x = padded
      if flip_axes:
        x = np.flip(x, axis=flip_axes)
      out[key] = np.ascontiguousarray(x, dtype=np.float32)[..., None]
    if self.positions:
      # The crop's own voxel positions, padded axes included, flipped with the image.
      crop_box = [(lo - o, lo - o + c) for (lo, _), o, c in zip(read_box, offsets, self.crop_size)]
      pos = position_grid(self.store.shape(sid), crop_box, self.positions)
      if flip_axes:
        pos = np.flip(pos, axis=flip_axes)
      out["position"] = np.ascontiguousarray(pos)
    if self.with_meta:
      out["subject_index"] = np.int32(record["index"])
      out["box_start"] = np.array([b[0] for b in read_box], dtype=np.int32)
      out["flips"] = np.array([a in flip_axes for a in range(3)], dtype=bool)
    return out


class GridCrop:
  """Reads one grid patch (a `GridSource` element) of every modality; a picklable Grain map.

  Voxels past the region's (or volume's) end along an axis shorter than the crop are PAD_VALUE,
  after the data, as the authors' loader pads.
  """

  def __init__(self, store: Store, modalities: Mapping[str, str], crop_size: Sequence[int],
               region: Mapping[int, Sequence[float]] | None = None, with_meta: bool = False,
               positions: bool | Sequence[int] = False):
    self.store = store
    self.modalities = dict(modalities)
    self.crop_size = tuple(int(c) for c in crop_size)
    self.region = None if region is None else {int(k): tuple(v) for k, v in region.items()}
    self.with_meta = with_meta
    self.positions = _axes_of(positions)

  def __call__(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
    sid = record["subject"]
    box = region_box(self.store.shape(sid), self.region)
    read_box = [(int(s), min(int(s) + c, hi)) for s, c, (_, hi) in
                zip(record["start"], self.crop_size, box)]
    out = {}
    for key, modality in self.modalities.items():
      x = self.store.read(sid, modality, read_box)
      if x.shape != self.crop_size:
        padded = np.full(self.crop_size, PAD_VALUE, dtype=np.float32)
        padded[tuple(slice(0, n) for n in x.shape)] = x
        x = padded
      out[key] = np.ascontiguousarray(x, dtype=np.float32)[..., None]
    if self.positions:
      crop_box = [(lo, lo + c) for (lo, _), c in zip(read_box, self.crop_size)]
      out["position"] = np.ascontiguousarray(
          position_grid(self.store.shape(sid), crop_box, self.positions))
    if self.with_meta:
      out["subject_index"] = np.int32(record["index"])
      out["box_start"] = np.array([b[0] for b in read_box], dtype=np.int32)
      out["flips"] = np.zeros(3, dtype=bool)
    return out


def region_shapes(store: Store, split: str,
                  region: Mapping[int, Sequence[float]] | None = None) -> dict[str, tuple]:
  """{subject id: the (D, H, W) of its region} for the subjects of one split (`region_box`)."""
  ids = [s["id"] for s in store.subjects(split)]
  if not ids:
    raise ValueError(f"{store.path}: split {split!r} has no subjects")
  return {sid: tuple(hi - lo for lo, hi in region_box(store.shape(sid), region)) for sid in ids}


def whole_crop_size(store: Store | str, split: str,
                    region: Mapping[int, Sequence[float]] | None,
                    multiple: Sequence[int] = (1, 1, 1)) -> tuple[int, int, int]:
  """The `crop_size` of `crops="whole"`: the split's training region padded to `multiple`.

  Args:
    store: a converted store (path or Store).
    split: the training split.
    region: the training region ({axis: (lo_frac, hi_frac)}, see `region_box`; None: whole
      volumes).
    multiple: the method's spatial multiple per axis (`method.spatial_multiple()`, e.g. 16 for
      PPDM r=4 with a 3-level U-Net).

  Returns:
    Per axis, the largest region extent over the split's subjects rounded up to `multiple`. Where
    the subjects' regions differ in shape, the smaller ones are edge-padded up to it
    (`WholeRegion`).
  """
  store = store if isinstance(store, Store) else Store(store)
  shapes = list(region_shapes(store, split, region).values())
  mult = tuple(int(m) for m in multiple)
  if len(mult) != 3 or min(mult) < 1:
    raise ValueError(f"multiple must be 3 positive ints, got {tuple(multiple)}")
  return tuple(-(-max(s[a] for s in shapes) // m) * m for a, m in enumerate(mult))


class WholeRegion:
  """A subject's whole region (or volume), edge-padded at its end to `crop_size`, random flips;
  a picklable Grain random map (the `crops="whole"` mode).

  Voxels past the region's end repeat its last voxel along each axis (numpy's "edge" mode), as
  the samplers pad a volume to their spatial multiple (jaxvol.ops.puzzle.pad_to_multiple), so a
  whole-region batch holds what a one-pass prediction of that region sees. Flips (the same for
  every modality) act on the padded array.
  """

  def __init__(self, store: Store, modalities: Mapping[str, str], crop_size: Sequence[int],
               flips: bool = True, region: Mapping[int, Sequence[float]] | None = None,
               with_meta: bool = False, positions: bool | Sequence[int] = False):
    self.store = store
    self.modalities = dict(modalities)
    self.crop_size = tuple(int(c) for c in crop_size)
    self.flips = bool(flips)
    self.region = None if region is None else {int(k): tuple(v) for k, v in region.items()}
    self.with_meta = with_meta
    self.positions = _axes_of(positions)

  def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    sid = record["subject"]
    box = region_box(self.store.shape(sid), self.region)
    pads = [(0, c - (hi - lo)) for (lo, hi), c in zip(box, self.crop_size)]
    if any(p < 0 for _, p in pads):
      raise ValueError(f"{sid}: region {tuple(hi - lo for lo, hi in box)} exceeds crop_size "
                       f"{self.crop_size} (crops='whole', see whole_crop_size)")
    flip_axes = [a for a, f in enumerate(rng.random(3) < 0.5) if f] if self.flips else []
    out = {}
    for key, modality in self.modalities.items():
      x = np.asarray(self.store.read(sid, modality, box), np.float32)
      if any(p for _, p in pads):
        x = np.pad(x, pads, mode="edge")
      if flip_axes:
        x = np.flip(x, axis=flip_axes)
      out[key] = np.ascontiguousarray(x)[..., None]
    if self.positions:
      crop_box = [(lo, lo + c) for (lo, _), c in zip(box, self.crop_size)]
      pos = position_grid(self.store.shape(sid), crop_box, self.positions)
      if flip_axes:
        pos = np.flip(pos, axis=flip_axes)
      out["position"] = np.ascontiguousarray(pos)
    if self.with_meta:
      out["subject_index"] = np.int32(record["index"])
      out["box_start"] = np.array([lo for lo, _ in box], dtype=np.int32)
      out["flips"] = np.array([a in flip_axes for a in range(3)], dtype=bool)
    return out


def _ensure_absl_flags_parsed() -> None:
  # Grain's worker processes read absl flags; unparsed flags raise UnparsedFlagAccessError there.
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_train_iterator(store_path: str | Store, split: str, modalities: Mapping[str, str],
                        crop_size: Sequence[int], batch_size: int, seed: int, num_workers: int = 0,
                        flips: bool = True, region: Mapping[int, Sequence[float]] | None = None,
                        process_index: int | None = None, process_count: int | None = None,
                        with_meta: bool = False, positions: bool | Sequence[int] = False,
                        crops: str = "random") -> grain.DatasetIterator:
  """Endless iterator of this host's share of random (grid, whole-region) paired crops.

  Args:
    store_path: a converted store (path or Store).
    split: 'train', 'val' or 'test'.
    modalities: output key -> store modality, e.g. {"cond": "pet_low", "target": "pet_full"}.
    crop_size: 3 ints (D, H, W).
    batch_size: GLOBAL batch size; each host yields batch_size // process_count.
    seed: shuffling and augmentation seed.
    num_workers: Grain worker processes (0: read in this process).
    flips: random flips along each axis with probability 0.5.
    region: {axis: (lo_frac, hi_frac)} keeping crops inside a slab (see `region_box`).
    process_index: this host's block of every global batch (default jax.process_index(); the
      training loop passes jaxvol.train.distributed.batch_shard of its batch sharding).
    process_count: number of blocks a global batch splits into (default jax.process_count()).
    with_meta: also yield "subject_index", "box_start" and "flips" per sample (for debugging).
    positions: also yield "position" (B, D, H, W, 3), the crop's normalised voxel positions in
      the whole volume (see `position_grid`): True for every axis, or the encoded axes
      (`position_axes(config.data)`; the other channels are 0).
    crops: "random" (a random corner per sample, `CropAndFlip`), "grid" (every patch of a
      50%-overlap grid, shuffled, never flipped: `GridSource`, `GridCrop`; `flips` is ignored) or
      "whole" (each subject's whole region, edge-padded at its end to `crop_size`, which must
      cover every subject's region: `WholeRegion`, `whole_crop_size`).

  Returns:
    A grain.DatasetIterator of dicts {key: float32 (B, D, H, W, 1)}; it supports get_state() and
    set_state() and can be saved with grain.checkpoint.
  """
  store = store_path if isinstance(store_path, Store) else Store(store_path)
  crop_size = tuple(crop_size)
  if len(crop_size) != 3 or not all(isinstance(c, (int, np.integer)) and c > 0 for c in crop_size):
    raise ValueError(f"crop_size must be 3 positive ints, got {crop_size!r}")
  if not modalities:
    raise ValueError("modalities must map at least one output key to a store modality")
  unknown = [m for m in modalities.values() if m not in store.modalities]
  if unknown:
    raise ValueError(f"{store.path}: no modalities {unknown}; the store has {store.modalities}")
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} must be in [0, {process_count})")
  if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  if batch_size % process_count:
    raise ValueError(f"global batch_size {batch_size} is not divisible by the {process_count} "
                     "processes")
  if num_workers < 0:
    raise ValueError(f"num_workers must be >= 0, got {num_workers}")
  if crops not in CROP_MODES:
    raise ValueError(f"crops must be one of {CROP_MODES}, got {crops!r}")
  # Plain dicts (configs may hand over ConfigDicts with string keys) pickle cleanly to workers.
  modalities = {str(k): str(v) for k, v in modalities.items()}
  region = None if not region else {int(k): tuple(float(f) for f in v) for k, v in region.items()}
  if crops == "grid":
    source = GridSource(store, split, crop_size, region)  # checks every subject's region
    ds = (grain.MapDataset.source(source)
          .shuffle(seed=seed)
          .repeat(None)
          .map(GridCrop(store, modalities, crop_size, region=region, with_meta=with_meta,
                        positions=positions)))
  elif crops == "whole":
    shapes = region_shapes(store, split, region)  # checks every subject's region
    large = {sid: s for sid, s in shapes.items() if any(n > c for n, c in zip(s, crop_size))}
    if large:
      need = tuple(max(s[a] for s in shapes.values()) for a in range(3))
      sid, shape = next(iter(large.items()))
      raise ValueError(
          f"crops='whole' trains on each subject's whole training region, but {len(large)} of "
          f"split {split!r} exceed crop_size {crop_size} (e.g. {sid}: {shape}): set crop_size "
          f"to at least {need}, each side rounded up to the method's spatial multiple "
          "(jaxvol.data.pipeline.whole_crop_size; e.g. 16 for PPDM r=4 with a 3-level U-Net)")
    ds = (grain.MapDataset.source(CropSource(store, split))
          .shuffle(seed=seed)
          .repeat(None)
          .random_map(WholeRegion(store, modalities, crop_size, flips=flips, region=region,
                                  with_meta=with_meta, positions=positions), seed=seed))
  else:
    source = CropSource(store, split)
    # Fail now, not in a worker, when a region is malformed or empty for some subject.
    for sid in source.subject_ids:
      region_box(store.shape(sid), region)
    crop = CropAndFlip(store, modalities, crop_size, flips=flips, region=region,
                       with_meta=with_meta, positions=positions)
    ds = (grain.MapDataset.source(source)
          .shuffle(seed=seed)
          .repeat(None)
          .random_map(crop, seed=seed))
  # Block first, slice second: host p gets rows [p * b, (p + 1) * b) of each global batch.
  ds = ds.batch(batch_size // process_count, drop_remainder=True)
  ds = ds[process_index::process_count].to_iter_dataset()
  if num_workers > 0:
    _ensure_absl_flags_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(ds)
