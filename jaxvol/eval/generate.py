"""--mode=sample for unconditional models: generated volumes as NIfTI, and generation metrics.

Used by PRDiT ("Pixel-Level Residual Diffusion Transformer: Scalable 3D CT Volume Generation",
ICLR 2026; configs/prdit_ct_gen.py) and by any method trained without condition channels.
`generate(config, workdir)` restores the latest checkpoint's EMA parameters (or
`config.eval.checkpoint_step`, `config.eval.use_ema`) and draws `config.sample.num` volumes of
`config.sample.shape` (default: the training crop), volume i from the key
fold_in(PRNGKey(config.sample.seed), i), so a volume does not depend on how many are drawn. One
compiled sampler serves every volume, drawn through the one inference path (jaxvol.eval.runner,
volumes with no target). Written under WORKDIR/samples/ (process 0 only, atomically:
each file, and the folder as a whole, which replaces the previous WORKDIR/samples once the run is
complete, jaxvol.fileio.fresh_dir, so no sample or generation_metrics.json of an
earlier run stays beside the new ones):

  sample_{i:03d}.nii.gz    float32, in the target's original units: the inverse of the store's
                           intensity preset of `config.data.target` (HU for the CT preset; CT
                           samples are clipped to the network range [-1, 1] first, i.e. to the
                           HU window the training data were clipped to).
  samples.json             what was drawn: checkpoint step, seeds, shape, spacing, affine, preset,
                           sampler settings, seconds per volume.
  generation_metrics.json  with config.sample.metrics: `jaxvol.eval.generation.generation_report`
                           of the samples against `num` random crops of the same shape from the
                           training split (FID or FD, MMD, MS-SSIM diversity) under
                           config.eval.generation_protocol: "authors" (PRDiT's evaluation code;
                           the network-range volumes, CT samples clipped to [-1, 1]) or "jaxvol"
                           (original units). It names its protocol, its feature network
                           (MedicalNet when config.eval.feature_weights is a file, with the
                           file's path and SHA-256, else a randomly initialised MedicalNet
                           ResNet, labelled "FD (random features)", not FID) and its counts.

Geometry (a generated volume belongs to no scanner): the affine is diag(spacing) in RAS with the
world origin at the volume's centre, voxel (i, j, k) at ((i, j, k) - (shape - 1) / 2) * spacing mm
along (right, anterior, superior). The spacing is config.sample.spacing, or else the RAS voxel
size of the first training subject's target volume in the store (the grid the model was trained
on), so viewers show the samples at the training data's physical size.
"""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxvol import fileio
from jaxvol import methods
from jaxvol.data import nifti
from jaxvol.data import presets as presets_lib
from jaxvol.data import pipeline
from jaxvol.data import store as store_lib
from jaxvol.eval import volumes
from jaxvol.eval import generation
from jaxvol.eval import runner
from jaxvol.eval import samplers
from jaxvol.models import medicalnet

log = logging.getLogger("jaxvol")


def sample_shape(config) -> tuple[int, int, int]:
  """config.sample.shape, or the training crop when it is empty."""
  shape = tuple(config.sample.shape) or tuple(config.data.crop_size)
  if len(shape) != 3 or any(int(v) < 1 for v in shape):
    raise ValueError(f"sample.shape must be 3 positive ints, got {shape}")
  return tuple(int(v) for v in shape)


def _train_subjects(config, store):
  subjects = [s for s in store.subjects(config.data.train_split)
              if config.data.target in s["volumes"]]
  if not subjects:
    raise ValueError(f"split {config.data.train_split!r} of {store.path} has no volume of "
                     f"{config.data.target!r}")
  return subjects


def ras_spacing(geometry: nifti.Geometry) -> tuple[float, float, float]:
  """Voxel size (mm) along the RAS axes of a stored volume (the column norms of its RAS affine)."""
  return tuple(float(v) for v in np.linalg.norm(nifti.ras_affine(geometry)[:3, :3], axis=0))


def sample_spacing(config, store) -> tuple[float, float, float]:
  """config.sample.spacing, or the RAS spacing of the first training subject's target."""
  if tuple(config.sample.spacing):
    spacing = tuple(float(v) for v in config.sample.spacing)
  else:
    sid = _train_subjects(config, store)[0]["id"]
    spacing = ras_spacing(store.geometry(sid, config.data.target))
  if len(spacing) != 3 or not all(np.isfinite(v) and v > 0 for v in spacing):
    raise ValueError(f"sample.spacing must be 3 positive sizes in mm, got {spacing}")
  return spacing


def sample_affine(shape, spacing) -> np.ndarray:
  """diag(spacing) in RAS with the world origin at the volume's centre (see the module doc)."""
  affine = np.diag([*map(float, spacing), 1.0])
  affine[:3, 3] = -np.asarray(spacing, np.float64) * (np.asarray(shape, np.float64) - 1) / 2
  return affine


def generation_protocol(config) -> str:
  """config.eval.generation_protocol, checked ("authors" when the config predates it)."""
  protocol = config.eval.get("generation_protocol", "authors")
  if protocol not in generation.PROTOCOLS:
    raise ValueError(f"eval.generation_protocol={protocol!r}; expected one of "
                     f"{generation.PROTOCOLS}")
  return protocol


def feature_network(config) -> generation.FeatureNetwork:
  """MedicalNet features from config.eval.feature_weights, or random MedicalNet features.

  The input convention follows config.eval.generation_protocol: volumes as given ("authors")
  or z-scored per volume ("jaxvol"). A weights file is hashed (SHA-256) for the report and
  checked against config.eval.feature_weights_sha256 when that is set.
  """
  e = config.eval
  resize = tuple(e.feature_resize) or None
  standardize = generation_protocol(config) == "jaxvol"
  if e.feature_weights:
    if not os.path.isfile(e.feature_weights):
      raise FileNotFoundError(f"eval.feature_weights={e.feature_weights!r} is not a file")
    digest = fileio.file_sha256(e.feature_weights)
    expected = e.get("feature_weights_sha256", "").strip().lower()
    if expected and expected != digest:
      raise ValueError(f"eval.feature_weights={e.feature_weights!r} has SHA-256 {digest}, not "
                       f"the expected eval.feature_weights_sha256={expected}")
    return generation.medicalnet_features(medicalnet.load_medicalnet(e.feature_weights),
                                          resize_to=resize, standardize=standardize,
                                          weights_file=os.path.abspath(e.feature_weights),
                                          weights_sha256=digest)
  return generation.random_medicalnet_features(e.seed, width=e.feature_width,
                                               depth=e.feature_depth, resize_to=resize,
                                               standardize=standardize)


def real_crops(config, store, shape, n: int, seed: int) -> np.ndarray:
  """n random crops (N, D, H, W) of the training split's targets, in network range.

  The training pipeline's crop (same region, padding with the range's minimum where the volume is
  smaller than the crop), without flips; subjects in turn.
  """
  subjects = _train_subjects(config, store)
  crop = pipeline.CropAndFlip(store, {"target": config.data.target}, shape, flips=False,
                              region=config.data.train_region)
  rng = np.random.default_rng(seed)
  return np.stack([crop({"subject": subjects[i % len(subjects)]["id"]}, rng)["target"][..., 0]
                   for i in range(n)])


def _condition(method, config, shape):
  """The (1, D, H, W, C) condition of an unconditional model: empty, or position channels only."""
  if method.cond_channels == 0:
    return jnp.zeros((1, *shape, 0), jnp.float32)
  if config.data.get("position_channels", False) and method.cond_channels == 3:
    # A generated volume is a whole volume: its positions span [-1, 1] on every encoded axis.
    axes = pipeline.position_axes(config.data)
    pipeline.check_position_coverage(config.data.train_region, None, axes)
    return jnp.asarray(pipeline.position_grid(shape, axes=axes)[None], jnp.float32)
  raise ValueError(f"--mode=sample draws from noise only for unconditional configs; this one has "
                   f"inputs {tuple(config.data.inputs)} (use --mode=evaluate)")


def generate(config, workdir: str) -> dict:
  """Draws config.sample.num volumes from the checkpoint in WORKDIR and writes them (module doc).

  The sampling is placed by jaxvol.eval.samplers.choose (config.mesh.spatial > 1 splits each
  generated volume's depth over that many devices).

  Returns:
    {"files": [paths], "samples": metadata as in samples.json, "metrics": report or None}.
  """
  method = methods.build(config, jax.devices()[0].platform)
  shape = sample_shape(config)
  mult = method.spatial_multiple()
  if any(v % m for v, m in zip(shape, mult)):
    raise ValueError(f"sample.shape {shape} must be a multiple of {mult} per axis for method "
                     f"{config.method!r}")
  num = int(config.sample.num)
  if num < 1:
    raise ValueError(f"sample.num must be >= 1, got {num}")
  store = store_lib.Store(config.data.store)
  first = _train_subjects(config, store)[0]["id"]
  preset = store.preset(first, config.data.target)
  spacing = sample_spacing(config, store)
  affine = sample_affine(shape, spacing)
  sampler = samplers.choose(config, method)
  params, step = volumes.load_params(config, workdir)
  model = _Draws(samplers.SamplerPredictor(sampler, sampler.put_params(params)),
                 clip=preset.name in presets_lib.CLIPPED)  # as the training data were clipped
  cond = np.asarray(_condition(method, config, shape))
  geometry = nifti.Geometry(affine, shape, spacing, "RAS")
  draws = [runner.Volume(name=f"sample_{i:03d}", inputs=cond, geometry=geometry,
                         to_units=lambda x: np.asarray(preset.inverse(x), np.float32))
           for i in range(num)]

  out_dir = os.path.join(workdir, "samples")
  writes = jax.process_index() == 0
  with fileio.fresh_dir(out_dir, writes) as work:  # process 0's folder
    rows = runner.run(draws, {runner.MODEL: model}, jax.random.PRNGKey(config.sample.seed), work,
                      nifti_dir="", previews=False, writes=writes,
                      stem=lambda volume, _: volume)
    files = [os.path.join(out_dir, f"{d.name}.nii.gz") for d in draws]
    seconds = [r[f"{runner.MODEL}_seconds"] for r in rows]
    info = {"method": config.method, "checkpoint_step": step, "use_ema": bool(config.eval.use_ema),
            "num": num, "seed": int(config.sample.seed), "key": "fold_in(PRNGKey(seed), i)",
            "shape": list(shape), "spacing_mm": list(spacing), "affine": affine.tolist(),
            "orientation": "RAS, origin at the volume centre", "units": _units(preset),
            "preset": preset.to_dict(), "files": [os.path.basename(f) for f in files],
            "seconds_per_volume": float(np.mean(seconds)),
            "first_call_seconds": float(seconds[0] + rows[0]["compile_seconds"])}
    info.update(method.sampling_facts())
    if writes:
      fileio.write_json_atomic(os.path.join(work, "samples.json"), info)

    report = None
    if config.sample.metrics:
      report = metrics_report(config, store, preset, np.stack(model.drawn), shape)
      report["checkpoint_step"] = step
      if writes:
        fileio.write_json_atomic(os.path.join(work, "generation_metrics.json"), report)
      log.info("[%s protocol] %s %.4g, %s %.4g, MS-SSIM diversity %s (real %s), features: %s",
               report["protocol"], report["fid_label"], report["fid"], report["mmd_label"],
               report["mmd"], _maybe(report["ms_ssim_diversity"]),
               _maybe(report["ms_ssim_diversity_real"]), report["feature_network"])
    return {"files": files, "samples": info, "metrics": report}


class _Draws:
  """The model's predictor for generated volumes: refuses non-finite samples, clips CT samples to
  the network range, and keeps every draw (network range) for the generation metrics."""

  def __init__(self, predictor, clip: bool):
    self.predictor, self.clip, self.drawn = predictor, clip, []

  def prepare(self, volume):
    return self.predictor.prepare(volume)

  def __call__(self, volume, key) -> np.ndarray:
    x = np.asarray(self.predictor(volume, key))[0, ..., 0].astype(np.float32)
    if not np.all(np.isfinite(x)):
      raise FloatingPointError(f"{volume.name} has non-finite values; nothing more is written")
    if self.clip:
      x = np.clip(x, -1.0, 1.0)
    self.drawn.append(x)
    return x


def _units(preset) -> str:
  return {"ct": "HU", "pet": "PET units of the store (SUV or counts)",
          "mri": "MRI intensity", "identity": "network range",
          "prdit": "HU, with the first training volume's own preset (PRDiT's per-volume "
                   "normalisation gives generated volumes no scale of their own)"}[preset.name]


def _maybe(value) -> str:
  return "n/a" if value is None else f"{value:.4f}"


def metrics_report(config, store, preset, fake: np.ndarray, shape) -> dict:
  """generation_report of generated volumes against as many real crops.

  `fake` is in the network's range, as sampled (CT clipped to [-1, 1]). Protocol "authors"
  scores network-range volumes, as PRDiT feeds its [-1, 1] CT; "jaxvol" scores original units
  with the preset's range as the MS-SSIM data range.
  """
  n = len(fake)
  if n < 2:
    raise ValueError("generation metrics need sample.num >= 2")
  protocol = generation_protocol(config)
  real = real_crops(config, store, shape, n, seed=config.sample.seed)
  net = feature_network(config)
  pairs = int(config.eval.get("ms_ssim_pairs", 0))
  if pairs < 0:
    raise ValueError(f"eval.ms_ssim_pairs must be >= 0 (0 = the protocol's default), got {pairs}")
  if protocol == "authors":
    report = generation.generation_report(real, fake, net, rng=config.sample.seed,
                                          protocol=protocol, diversity_pairs=pairs)
    report["units"] = "network range"
  else:
    real_raw = np.asarray(preset.inverse(real), np.float32)
    fake_raw = np.asarray(preset.inverse(fake), np.float32)
    report = generation.generation_report(real_raw, fake_raw, net, rng=config.sample.seed,
                                          protocol=protocol, diversity_pairs=pairs,
                                          data_range=float(preset.hi - preset.lo))
    report["units"] = _units(preset)
  subjects = _train_subjects(config, store)
  report["real"] = (f"{n} random crops of {'x'.join(map(str, shape))} from the "
                    f"{config.data.train_split!r} split ({len(subjects)} volume(s)) of "
                    f"{store.path}")
  if len(subjects) < n:
    report["note"] = (f"only {len(subjects)} training volume(s): the real set is crops of the same "
                      "scan(s), so these numbers check the mechanics, not a generative model of "
                      "a population")
  return report
