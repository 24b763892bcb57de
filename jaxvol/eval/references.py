"""Classical references: what a user gets without training, tuned on the training data only.

Every evaluation scores, beside the model and the floors, the predictions of classical methods
applied to the input (original units), each with its parameters chosen on the TRAINING split's
training region (never on validation or test voxels) by the evaluation's own criterion: PSNR
inside the target's body mask over the target preset's range, averaged over the training pairs.

  gaussian      Gaussian blur of the input, sigma (voxels) from a grid (denoising).
  nlm           scikit-image's 3D non-local means (fast mode, 3^3 patches, search radius 4),
                its strength h from a grid of multiples of the noise level measured on the
                training pairs (std of input - target in the body).
  bm4d          BM4D (the `bm4d` PyPI package: Tampere University's binaries, free for
                non-commercial use only; `make setup` installs it through the `references`
                extra, `pip install jaxvol` does not), white-noise profile, sigma from the same
                kind of grid. Offered only when the package imports. (Its correlated-noise
                profile, which takes a noise PSD, calls numpy.trapz, gone from NumPy 2.)
  lut           an intensity look-up table fitted on the training pairs: the mean target
                intensity in each of 128 input-intensity bins (between the input's 0.1 and 99.9
                percentiles), linear between bin centres, empty bins bridged (cross-modal
                translation: T1 -> T2, NAC -> AC PET).
  lut_gaussian  the look-up table followed by a Gaussian blur tuned after it.
  bspline       cubic B-spline interpolation from the input's coarse samples along one axis
                (super-resolution of thick-slice inputs that were linearly interpolated back to the
                fine grid, jaxvol.data.degrade.simulate_low_resolution): the slice factor and axis
                are tuned like any other parameter (factor 1 is the input itself).

`config.eval.references` names the references scored; "auto" takes gaussian and the non-local
denoiser (bm4d when it imports, else nlm) where the input shares the target's units, and lut and
lut_gaussian where it does not; "cheap" (the smoke configs) gaussian or lut alone. `tune`
returns, per reference, its parameters, its tuning score and every grid point tried (the
one-parameter grids of gaussian, nlm and bm4d are walked in increasing strength and stop two
points after the peak); evaluation writes them to summary.json["references"] and
references.json, and caches them in WORKDIR/references_tuned.json under a key of everything the
tuning read (store, split, region, modalities, data range, grids), so the evaluations of a run's
checkpoints tune once.

Tuning pairs are the training subjects' training regions, each limited to a centred box of at
most `tune_box` voxels per axis (`config.eval.reference_tune_box`; the non-local denoisers cost
seconds per 10^5 voxels on a CPU). The tuned references are applied to the whole input volume
and then cut to the evaluated box, so they see at least the context the model sees.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

from jaxvol.errors import ConfigError
from jaxvol.eval import metrics as metrics_lib

log = logging.getLogger("jaxvol")

GAUSSIAN_SIGMAS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)  # voxels; 0 = the input itself
NLM_H = (0.4, 0.6, 0.8, 1.0, 1.3)       # h / noise std
BM4D_SIGMA = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0)  # sigma / noise std (FBP noise is correlated: the
#                                             white-noise profile wants more than its std)
LUT_BINS = 128
BSPLINE_FACTORS = (1, 2, 3, 4)
DENOISING = ("gaussian", "nonlocal")
TRANSLATION = ("lut", "lut_gaussian")


@dataclasses.dataclass
class Pair:
  """One tuning pair: the input and target over a training region, in original units."""
  name: str
  input: np.ndarray
  target: np.ndarray


def _imports(module: str) -> bool:
  try:
    __import__(module)
  except Exception:  # pylint: disable=broad-except
    return False
  return True


def bm4d_available() -> bool:
  return _imports("bm4d")


def resolve_names(names, comparable: bool) -> list[str]:
  """config.eval.references as a list of reference names ("auto" and "nonlocal" resolved)."""
  if isinstance(names, str):
    names = [n.strip() for n in names.split(",") if n.strip()]
  out = []
  for n in names:
    if n == "auto":
      group = DENOISING if comparable else TRANSLATION
    elif n == "cheap":  # one reference that costs milliseconds (the smoke configs)
      group = ("gaussian",) if comparable else ("lut",)
    else:
      group = (n,)
    for m in group:
      if m == "nonlocal":
        m = "bm4d" if bm4d_available() else "nlm" if _imports("skimage") else None
        if m is None:
          log.warning("no non-local denoiser to score: install bm4d or scikit-image "
                      "(pip install 'jaxvol[references]')")
          continue
      if m not in REFERENCES:
        raise ConfigError(f"unknown classical reference {m!r} in config.eval.references; known: "
                         f"{', '.join(sorted(REFERENCES))}, auto, cheap, nonlocal")
      if m == "nlm" and not _imports("skimage"):
        raise ConfigError("config.eval.references names nlm but scikit-image does not import here: "
                         "pip install 'jaxvol[references]'")
      if m == "bm4d" and not bm4d_available():
        raise ConfigError("config.eval.references names bm4d but the bm4d package does not import "
                         "here: pip install 'jaxvol[references]', or name nlm")
      if m not in out:
        out.append(m)
  return out


# The references. Each has `apply(x, params) -> prediction` on an original-unit volume and
# `candidates(pairs) -> [params]` (grids may depend on the training pairs, never on evaluated data).


def noise_std(pairs: Sequence[Pair]) -> float:
  """The std of input - target inside the targets' body masks, pooled over the pairs."""
  diffs = [(p.input - p.target)[metrics_lib.body_mask(p.target)] for p in pairs]
  diffs = np.concatenate([d.ravel() for d in diffs]) if diffs else np.zeros(1)
  return float(np.std(diffs.astype(np.float64))) or 1.0


class Gaussian:
  name = "gaussian"
  unimodal = True

  def candidates(self, pairs):
    del pairs
    return [{"sigma": s} for s in (0.0,) + GAUSSIAN_SIGMAS]

  def apply(self, x, params):
    s = float(params["sigma"])
    return np.asarray(x, np.float32) if s <= 0 else ndimage.gaussian_filter(
        np.asarray(x, np.float32), s, mode="nearest")


class NonLocalMeans:
  name = "nlm"
  unimodal = True

  def candidates(self, pairs):
    sd = noise_std(pairs)
    return [{"h": k * sd, "sigma": sd, "h_over_sigma": k} for k in NLM_H]

  def apply(self, x, params):
    from skimage.restoration import denoise_nl_means  # pylint: disable=g-import-not-at-top
    return denoise_nl_means(np.asarray(x, np.float32), patch_size=3, patch_distance=4,
                            h=float(params["h"]), sigma=float(params["sigma"]),
                            fast_mode=True).astype(np.float32)


class BM4D:
  name = "bm4d"
  unimodal = True

  def candidates(self, pairs):
    sd = noise_std(pairs)
    return [{"sigma": k * sd, "sigma_over_noise": k} for k in BM4D_SIGMA]

  def apply(self, x, params):
    import bm4d  # pylint: disable=g-import-not-at-top
    return np.asarray(bm4d.bm4d(np.asarray(x, np.float64), float(params["sigma"])), np.float32)


def fit_lut(pairs: Sequence[Pair], bins: int = LUT_BINS) -> dict:
  """The look-up table's bin centres and values (module docstring) from the training pairs."""
  x = np.concatenate([p.input.ravel() for p in pairs]).astype(np.float64)
  y = np.concatenate([p.target.ravel() for p in pairs]).astype(np.float64)
  lo, hi = np.percentile(x, [0.1, 99.9])
  if not hi > lo:
    hi = lo + 1.0
  edges = np.linspace(lo, hi, bins + 1)
  idx = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, bins - 1)
  count = np.bincount(idx, minlength=bins)
  total = np.bincount(idx, weights=y, minlength=bins)
  centres = 0.5 * (edges[:-1] + edges[1:])
  keep = count > 0
  return {"x": centres[keep].tolist(), "y": (total[keep] / count[keep]).tolist(), "bins": bins}


class LUT:
  name = "lut"

  def candidates(self, pairs):
    return [fit_lut(pairs)]

  def apply(self, x, params):
    return np.interp(np.asarray(x, np.float64), params["x"], params["y"]).astype(np.float32)


class LUTGaussian:
  name = "lut_gaussian"

  def candidates(self, pairs):
    table = fit_lut(pairs)
    return [{**table, "sigma": s} for s in (0.0,) + GAUSSIAN_SIGMAS]

  def apply(self, x, params):
    return Gaussian().apply(LUT().apply(x, params), params)


def bspline_upsample(x, factor: int, axis: int) -> np.ndarray:
  """Cubic B-spline through the block centres of a `factor`-thick-slice volume along `axis`.

  The input's coarse samples sit at voxel b * factor + (factor - 1) / 2 (where a linear
  interpolation back to the fine grid passes through them); they are read there by linear
  interpolation and then interpolated to every voxel by a cubic B-spline (edge values kept beyond
  the first and last sample)."""
  x = np.asarray(x, np.float64)
  if factor <= 1:
    return x.astype(np.float32)
  n = x.shape[axis]
  centres = np.arange(-(-n // factor)) * factor + (factor - 1) / 2.0
  centres = np.clip(centres, 0, n - 1)
  moved = np.moveaxis(x, axis, 0)
  lo = np.floor(centres).astype(int)
  hi = np.minimum(lo + 1, n - 1)
  w = (centres - lo).reshape((-1,) + (1,) * (moved.ndim - 1))
  coarse = (1 - w) * moved[lo] + w * moved[hi]
  where = np.clip((np.arange(n) - (factor - 1) / 2.0) / factor, 0, len(centres) - 1)
  coeffs = ndimage.spline_filter1d(coarse, order=3, axis=0, mode="nearest")
  grid = np.meshgrid(where, *[np.arange(s) for s in moved.shape[1:]], indexing="ij")
  fine = ndimage.map_coordinates(coeffs, grid, order=3, mode="nearest", prefilter=False)
  return np.moveaxis(fine, 0, axis).astype(np.float32)


class BSpline:
  name = "bspline"

  def candidates(self, pairs):
    del pairs
    return [{"factor": 1, "axis": 0}] + [{"factor": f, "axis": a} for f in BSPLINE_FACTORS[1:]
                                         for a in range(3)]

  def apply(self, x, params):
    return bspline_upsample(x, int(params["factor"]), int(params["axis"]))


REFERENCES = {c.name: c for c in (Gaussian, NonLocalMeans, BM4D, LUT, LUTGaussian, BSpline)}
LABELS = {"gaussian": "Gaussian blur", "nlm": "non-local means", "bm4d": "BM4D",
          "lut": "intensity look-up table", "lut_gaussian": "look-up table + Gaussian",
          "bspline": "cubic B-spline"}


def score(pred, target, data_range: float) -> float:
  """The tuning criterion: PSNR inside the target's body mask over `data_range`."""
  return metrics_lib.psnr(pred, target, metrics_lib.body_mask(target), data_range)


def tune_one(name: str, pairs: Sequence[Pair], data_range: float) -> dict:
  """{"name", "params", "train_psnr", "grid": [[params (tables left out), psnr], ...]}: the grid
  point with the best mean tuning score over `pairs`."""
  if not pairs:
    raise ValueError(f"no training pairs to tune the classical reference {name!r} on")
  ref = REFERENCES[name]()
  tried = []
  for params in ref.candidates(pairs):
    s = float(np.mean([score(ref.apply(p.input, params), p.target, data_range) for p in pairs]))
    tried.append((params, s))
    # One-parameter grids in increasing strength: the score rises to one peak and falls, so
    # two points in a row below the best end the search (the non-local denoisers cost seconds).
    scores = [t[1] for t in tried]
    if getattr(ref, "unimodal", False) and len(scores) >= 3 and max(scores[-2:]) < max(scores):
      if scores.index(max(scores)) < len(scores) - 2:
        break
  best, best_score = max(tried, key=lambda t: -np.inf if math.isnan(t[1]) else t[1])
  brief = lambda p: {k: v for k, v in p.items() if k not in ("x", "y")}
  return {"name": name, "label": LABELS[name], "params": best, "train_psnr": best_score,
          "grid": [[brief(p), s] for p, s in tried]}


def tune(names: Sequence[str], pairs: Sequence[Pair], data_range: float,
         report: Callable[[str], None] | None = None) -> dict[str, dict]:
  """{name: tune_one(...)} for every reference named."""
  report = report or log.info
  out = {}
  for name in names:
    out[name] = tune_one(name, pairs, data_range)
    shown = {k: (round(v, 4) if isinstance(v, float) else v)
             for k, v in out[name]["params"].items() if k not in ("x", "y")}
    report(f"classical reference {name}: {shown} (training PSNR {out[name]['train_psnr']:.2f} dB "
           f"over {len(pairs)} training pair(s))")
  return out


def apply(tuned: dict, x) -> np.ndarray:
  """The prediction of one tuned reference (an entry of `tune`) for an original-unit input."""
  return REFERENCES[tuned["name"]]().apply(x, tuned["params"])


def cache_key(parts: dict) -> str:
  """A short, stable hash of everything a tuning read."""
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def grid_version() -> str:
  """A hash of the grids and rules above: a cached tuning is redone when they change."""
  return cache_key({"gaussian": GAUSSIAN_SIGMAS, "nlm": NLM_H, "bm4d": BM4D_SIGMA, "lut": LUT_BINS,
                    "bspline": BSPLINE_FACTORS, "version": 2})


def public(tuned: dict[str, dict]) -> dict[str, dict]:
  """The tuned references as summary.json records them (look-up tables summarised by their
  number of bins, the full tables stay in references.json)."""
  out = {}
  for name, entry in tuned.items():
    params = {k: v for k, v in entry["params"].items() if k not in ("x", "y")}
    out[name] = {**{k: v for k, v in entry.items() if k != "params"}, "params": params}
  return out


def from_summary(summary: dict, metrics=("psnr", "ssim", "hfen")) -> dict[str, dict]:
  """{name: {"label", "params", metric: value...}} of the classical references an evaluation
  summary scored (the rows experiments add to their tables); {} when it scored none."""
  out = {}
  for name, entry in (summary.get("references") or {}).items():
    scores = {k: summary["metrics"].get(k, {}).get(name) for k in metrics}
    out[name] = {"label": entry.get("label", name), "params": entry.get("params", {}), **scores}
  return out


def table_label(name: str, entry: dict) -> str:
  """'Gaussian blur (sigma 1, tuned on training data)' for a table row."""
  params = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in entry.get("params", {}).items()
                     if k not in ("bins", "sigma_over_noise", "h_over_sigma"))
  return f"{entry.get('label', name)} ({params + ', ' if params else ''}tuned on training data)"
