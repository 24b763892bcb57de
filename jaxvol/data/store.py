"""The preconverted store: NIfTI volumes -> chunked zarr arrays + a JSON manifest.

Training reads many small random crops; decoding whole .nii.gz files for each crop would dominate
the step time. `convert` reads every NIfTI once, reorients it to RAS, maps it to the network range
with an intensity preset and writes it as a chunked, compressed zarr array through tensorstore, so
a crop read only touches the chunks it overlaps (the same code reads local disk or a bucket).

Layout::

  STORE/manifest.json                   written last; its presence means "complete"
  STORE/manifest.partial.json           only while converting: subjects finished so far
  STORE/volumes/{subject}/{modality}.zarr   float32, RAS, preset-normalised, chunks <= 32^3

Manifest::

  {"version": 1, "modalities": [...], "presets": {modality: spec},
   "subjects": [{"id", "split", "shape" (RAS), "volumes": {modality: {
       "path" (relative to STORE), "source" (the NIfTI), "geometry" (Geometry.to_dict()),
       "preset" (Preset.to_dict()), "stats" (min, max, mean, std, p01, p99 of the raw volume)}}}]}

A test subject may lack modalities (e.g. a Decathlon test list without the label); its "volumes"
then holds only those it has.

Safety rules of `convert`:
  * Every input is loaded and checked (readable, 3D, finite, paired volumes on one grid, presets
    fit) BEFORE anything is written, so a bad input fails with nothing created. The price is that
    each file is read twice (once to check, once to write).
  * Each volume is written to a temporary name and renamed, so a volume is either complete or
    absent; the manifest is written last the same way.
  * Resume: after each subject, `manifest.partial.json` lists the finished subjects. If a
    conversion is interrupted (Ctrl-C, killed, machine lost), calling `convert` again with the same
    datalist and presets skips those subjects. If it fails with an error instead, everything this
    call wrote is removed (the whole folder when this call created it); when it had resumed a
    partial conversion, the subjects finished earlier are kept.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from typing import Any, Mapping, Sequence

import logging

import numpy as np
import tensorstore as ts

from jaxvol import fileio
from jaxvol.data import nifti
from jaxvol.data import presets as presets_lib
from jaxvol.data.nifti import VolumeError

MANIFEST = "manifest.json"
PARTIAL = "manifest.partial.json"
VOLUMES = "volumes"
VERSION = 2  # 2: data-dependent presets fitted on the training split by default ("fitted")
READS = (1, 2)  # manifest versions this code reads (1 with a warning, see Store)
FITS = ("train", "volume")
SPLITS = ("train", "val", "test")
CHUNK = 32
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # Used as folder and file names.
_COMPRESSOR = {"id": "blosc", "cname": "zstd", "clevel": 5, "shuffle": 1}
log = logging.getLogger("jaxvol")


# ----------------------------------------------------------------------------------------------
# Datalists.


# Decathlon (MONAI) list names -> splits, in the order their subjects are listed.
_DECATHLON = (("training", "train"), ("validation", "val"), ("test", "test"), ("testing", "test"))
_NIFTI_SUFFIX = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)


def read_datalist(path: str | os.PathLike,
                  dataroot: str | os.PathLike | None = None) -> list[dict[str, Any]]:
  """Reads a datalist (CSV, JSON or MONAI Decathlon JSON) naming the NIfTI files of each subject.

  CSV: a header row, one row per subject, one column per modality, plus optional "subject" and
  "split" columns. JSON: a list of objects, or {"subjects": [...]}; each object maps modality ->
  file, plus optional "subject" (or "id") and "split". In both, missing ids become "sub-0000",
  "sub-0001", ... by position and missing splits are "train".

  Decathlon JSON (MONAI's `dataset.json` / datalist layout): an object with lists under
  "training", "validation" and/or "test" (or "testing"), whose subjects get the splits "train",
  "val" and "test". Each entry maps keys (modalities, e.g. "image" and "label") to files; a bare
  string entry, as in Decathlon's test lists, is the file of "image". An entry's "id" or "subject"
  is its id; otherwise the id is the first file's name without .nii/.nii.gz (other characters
  than letters, digits, '.', '_' and '-' become '_'; a repeated name gets -1, -2, ...). A "fold"
  key (MONAI's cross-validation folds) is ignored; other keys of the object ("name", "labels",
  "numTraining", ...) too.

  Every train and val subject must have the same modalities. A test subject may lack some of them
  (an empty CSV cell, a null or missing key, e.g. a test list without the target): it has no
  volume of that modality in the store, and evaluation scores only the subjects that have the
  target. It may not have modalities that the others lack.

  Relative paths are relative to `dataroot` when given (itself relative to the working
  directory), else to the "dataroot" of a JSON object (itself relative to the datalist's folder),
  else to the datalist's folder.

  Args:
    path: the datalist; ".csv" is read as CSV, anything else as JSON.
    dataroot: folder of the relative paths, overriding the datalist's own.

  Returns:
    [{"subject": id, "split": split, "volumes": {modality: absolute path}}], in datalist order
    (for Decathlon JSON: training, validation, then test subjects).

  Raises:
    VolumeError: naming the datalist, when it is missing, unparsable, empty, or inconsistent.
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.isfile(path):
    raise VolumeError(f"{path}: datalist not found")
  base = os.path.dirname(path)
  try:
    with open(path, newline="") as f:
      if path.lower().endswith(".csv"):
        obj = [{k.strip(): (v or "").strip() for k, v in r.items() if k is not None}
               for r in csv.DictReader(f)]
      else:
        obj = json.load(f)
  except (OSError, ValueError, csv.Error) as e:
    raise VolumeError(f"{path}: cannot parse datalist ({type(e).__name__}: {e})") from e
  rows = obj
  if isinstance(obj, dict):
    root = obj.get("dataroot")
    if root is not None:
      if not isinstance(root, str) or not root:
        raise VolumeError(f"{path}: \"dataroot\" must be a folder name, got {root!r}")
      base = os.path.join(base, root)
    rows = obj.get("subjects") if "subjects" in obj else _decathlon_rows(path, obj)
  if dataroot is not None:
    base = os.path.abspath(os.fspath(dataroot))
  if not isinstance(rows, list):
    raise VolumeError(f"{path}: datalist must be a list of subjects, {{\"subjects\": [...]}} or "
                      "a Decathlon object with \"training\"/\"validation\"/\"test\" lists")
  if not rows:
    raise VolumeError(f"{path}: datalist is empty (no subjects)")

  out, seen = [], set()
  for i, row in enumerate(rows):
    if not isinstance(row, dict):
      raise VolumeError(f"{path}: entry {i} is not an object")
    row = dict(row)
    sid = str(row.pop("subject", None) or row.pop("id", None) or f"sub-{i:04d}")
    row.pop("id", None)
    split = str(row.pop("split", None) or "train")
    if not _SAFE_NAME.match(sid):
      raise VolumeError(f"{path}: subject id {sid!r} must be letters, digits, '.', '_' or '-'")
    if sid in seen:
      raise VolumeError(f"{path}: subject id {sid!r} appears twice")
    seen.add(sid)
    if split not in SPLITS:
      raise VolumeError(f"{path}: subject {sid!r} has split {split!r}; expected one of {SPLITS}")
    if split == "test":  # A test subject may lack a modality (e.g. the target).
      row = {mod: f for mod, f in row.items() if f is not None and f != ""}
    if not row:
      raise VolumeError(f"{path}: subject {sid!r} lists no volumes")
    for mod, f in row.items():
      if not _SAFE_NAME.match(mod):
        raise VolumeError(f"{path}: modality name {mod!r} must be letters, digits, '.', '_' or '-'")
      if isinstance(f, list):
        raise VolumeError(f"{path}: subject {sid!r} gives a list of files for modality {mod!r}; "
                          "give each file (channel) its own modality name")
      if not isinstance(f, str) or not f:
        raise VolumeError(f"{path}: subject {sid!r} has no file for modality {mod!r}")
    out.append({"subject": sid, "split": split, "volumes": row})

  modalities = _datalist_modalities(out)
  first = next((s for s in out if s["split"] != "test"), None)
  for s in out:
    have = set(s["volumes"])
    if s["split"] == "test":
      extra = sorted(have - set(modalities))
      if extra:
        raise VolumeError(f"{path}: test subject {s['subject']!r} has modalities {extra} that "
                          f"the other subjects lack (they have {sorted(modalities)})")
    elif have != set(modalities):
      raise VolumeError(f"{path}: subject {s['subject']!r} has modalities {sorted(have)}, "
                        f"subject {first['subject']!r} has {sorted(modalities)}")
    s["volumes"] = {m: os.path.normpath(os.path.join(base, s["volumes"][m]))
                    for m in modalities if m in have}
  return out


def _datalist_modalities(subjects: Sequence[dict]) -> list[str]:
  """The modalities of a datalist: those of its first train or val subject (`read_datalist`
  checks that the others have the same), or, with only test subjects, every one that any of them
  has, in the order of their first appearance."""
  for s in subjects:
    if s["split"] != "test":
      return list(s["volumes"])
  return list(dict.fromkeys(m for s in subjects for m in s["volumes"]))


def _decathlon_rows(path: str, obj: dict) -> list[dict[str, Any]]:
  """The entries of a Decathlon object as JSON-datalist rows, with "split" and a unique
  "subject" id set (see `read_datalist`)."""
  lists = [(key, split) for key, split in _DECATHLON if key in obj]
  if not lists:
    raise VolumeError(f"{path}: a JSON object datalist needs a \"subjects\" list or Decathlon "
                      "lists (\"training\", \"validation\", \"test\" or \"testing\"); it has keys "
                      f"{sorted(obj)}")
  rows = []
  for key, split in lists:
    entries = obj[key]
    if not isinstance(entries, list):
      raise VolumeError(f"{path}: \"{key}\" must be a list of entries, got "
                        f"{type(entries).__name__}")
    for j, entry in enumerate(entries):
      if isinstance(entry, str):
        entry = {"image": entry}
      if not isinstance(entry, dict):
        raise VolumeError(f"{path}: \"{key}\" entry {j} must be an object of files or a file name, "
                          f"got {type(entry).__name__}")
      entry = dict(entry)
      entry.pop("fold", None)
      if entry.get("split") not in (None, split):
        raise VolumeError(f"{path}: \"{key}\" entry {j} has split {entry['split']!r}, but the "
                          f"\"{key}\" list is the {split!r} split")
      entry["split"] = split
      rows.append((key, j, entry))
  if not rows:
    raise VolumeError(f"{path}: datalist is empty (the Decathlon lists "
                      f"{[key for key, _ in lists]} have no entries)")
  given = [str(e.get("subject") or e.get("id") or "") for _, _, e in rows]
  taken = {g for g in given if g}
  out = []
  for (key, j, entry), sid in zip(rows, given):
    if not sid:
      files = [f for k, f in entry.items()
               if k not in ("subject", "id", "split") and isinstance(f, str) and f]
      # Without a file the entry is refused below; its id then says where it is.
      stem = _NIFTI_SUFFIX.sub("", os.path.basename(files[0])) if files else f"{key}-{j}"
      stem = re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip("._-") or f"{key}-{j}"
      sid, n = stem, 0
      while sid in taken:
        n += 1
        sid = f"{stem}-{n}"
      taken.add(sid)
    entry.pop("id", None)
    entry["subject"] = sid
    out.append(entry)
  return out


# ----------------------------------------------------------------------------------------------
# Conversion.


def _normalise_specs(presets: Mapping[str, Any], modalities: Sequence[str]) -> dict[str, dict]:
  """Preset specs as {modality: {"kind", "ref", **kw}}; a bare string is a kind."""
  missing = [m for m in modalities if m not in presets]
  if missing:
    raise ValueError(f"no intensity preset for modalities {missing}; give one per modality "
                     f"(kinds: {presets_lib.KINDS})")
  extra = [m for m in presets if m not in modalities]
  if extra:
    raise ValueError(f"presets name modalities {extra} that the datalist does not have "
                     f"(it has {list(modalities)})")
  specs = {}
  for mod in modalities:
    spec = presets[mod]
    spec = {"kind": spec} if isinstance(spec, str) else dict(spec)
    if spec.get("kind") not in presets_lib.KINDS:
      raise ValueError(f"preset for {mod!r}: kind must be one of {presets_lib.KINDS}, "
                       f"got {spec.get('kind')!r}")
    ref = spec.get("ref")
    if ref is not None and ref not in modalities:
      raise ValueError(f"preset for {mod!r}: ref {ref!r} is not a modality of the datalist")
    kw = {k: v for k, v in spec.items() if k not in ("kind", "ref", "fit")}
    fit = spec.get("fit")
    if fit is not None and fit not in FITS:
      raise ValueError(f"preset for {mod!r}: fit must be one of {FITS}, got {fit!r}")
    if ref is None and presets_lib.depends_on_volume(spec["kind"], kw):
      spec["fit"] = fit or "train"
    elif fit is not None:
      why = (f"it takes the scale of {ref!r}" if ref is not None
             else "its keywords fix lo and hi")
      raise ValueError(f"preset for {mod!r}: fit={fit} has no effect, {why}")
    specs[mod] = spec
  for mod, spec in specs.items():
    ref = spec.get("ref")
    if ref is None:
      continue
    if specs[ref].get("ref") is not None:
      raise ValueError(f"preset for {mod!r}: ref {ref!r} has a ref itself; point both at one "
                       "modality")
    if specs[ref]["kind"] != spec["kind"]:
      raise ValueError(f"preset for {mod!r}: kind {spec['kind']!r} cannot share the scale of "
                       f"{ref!r}, whose kind is {specs[ref]['kind']!r}")
  return specs


def _kw(spec: dict) -> dict:
  """The `fit_preset` keywords of a spec."""
  return {k: v for k, v in spec.items() if k not in ("kind", "ref", "fit")}


def _fit_presets(specs: dict[str, dict], arrays: dict[str, np.ndarray],
                 sources: dict[str, str],
                 train_fitted: Mapping[str, presets_lib.Preset] | None = None,
                 ) -> dict[str, presets_lib.Preset]:
  """Fits every modality's preset for one subject.

  A spec with fit=train takes `train_fitted[mod]` (fitted on the training split); fit=volume
  fits on this subject's own volume. A spec with `ref` takes the ref modality's FITTED preset
  (its lo/hi: the same scale, whatever keywords, e.g. a cap, the ref was given), with its own
  keywords (lo, hi, cap, ...) overriding it.

  A modality missing from `arrays` (a test subject without the target) gets a preset only when a
  present modality takes its scale, and only one that needs no volume of this subject."""
  fitted = {}
  for mod in sorted(specs, key=lambda m: specs[m].get("ref") is not None):  # refs first
    spec = specs[mod]
    kw = _kw(spec)
    ref = spec.get("ref")
    src = ref or mod
    if mod not in arrays and not any(specs[m].get("ref") == mod for m in arrays):
      continue
    try:
      if spec.get("fit") == "train" and train_fitted is not None:
        # Fitted on the training split; the own fit only checks the volume (e.g. not all zero).
        if mod in arrays:
          presets_lib.fit_preset(spec["kind"], arrays[mod], **kw)
        fitted[mod] = train_fitted[mod]
        continue
      if ref is not None:
        scale = {"lo": fitted[ref].lo, "hi": fitted[ref].hi}
        if {"hi", "cap", "percentile", "upper"} & set(kw):
          del scale["hi"]  # this modality sets its own upper end
        if {"lo", "lower"} & set(kw):
          del scale["lo"]
        kw = {**scale, **kw}
      fitted[mod] = presets_lib.fit_preset(spec["kind"], arrays.get(src), **kw)
    except ValueError as e:
      if src not in arrays:
        raise VolumeError(f"{next(iter(sources.values()))}: this subject has no {src!r} volume, "
                          f"whose {specs[src]['kind']!r} preset sets the scale of a modality it "
                          f"has ({e}); give that preset fit=train or a fixed lo/hi") from e
      raise VolumeError(f"{sources[src]}: cannot fit the {spec['kind']!r} preset for "
                        f"{mod!r}: {e}") from e
  return fitted


def _stats(x: np.ndarray) -> dict[str, float]:
  p01, p99 = np.percentile(x, [1.0, 99.0])
  return {"min": float(x.min()), "max": float(x.max()), "mean": float(x.mean(dtype=np.float64)),
          "std": float(x.std(dtype=np.float64)), "p01": float(p01), "p99": float(p99)}


def _fit_on_training_split(subjects: Sequence[dict], specs: dict[str, dict]
                           ) -> dict[str, presets_lib.Preset]:
  """The presets of fit=train specs: each training subject's own fit, then the median of their
  lo and of their hi, so that no volume outside the training split (a test target) sets a
  scale. Reads only those modalities of the training subjects."""
  mods = [m for m, s in specs.items() if s.get("fit") == "train"]
  if not mods:
    return {}
  train = [s for s in subjects if s["split"] == "train"]
  if not train:
    raise ValueError(
        f"presets of {mods} are fitted on the training split (fit=train, the default for "
        "percentile presets), but the datalist has no 'train' subject; give the scale "
        "explicitly (lo/hi, or a PET cap, e.g. the values a trained checkpoint's store used), "
        "or fit=volume for a modality that inference has (an input)")
  fits = {m: [] for m in mods}
  for subject in train:
    for m in mods:
      arr, _ = nifti.load_volume(subject["volumes"][m])
      try:
        fits[m].append(presets_lib.fit_preset(specs[m]["kind"], arr, **_kw(specs[m])))
      except ValueError as e:
        raise VolumeError(f"{subject['volumes'][m]}: cannot fit the {specs[m]['kind']!r} preset "
                          f"for {m!r}: {e}") from e
  return {m: presets_lib.Preset(specs[m]["kind"], float(np.median([p.lo for p in fits[m]])),
                                float(np.median([p.hi for p in fits[m]]))) for m in mods}


def _plan_subject(subject: dict, specs: dict[str, dict],
                  train_fitted: Mapping[str, presets_lib.Preset] | None = None) -> dict[str, Any]:
  """Loads and checks one subject; returns its manifest entry (no arrays kept)."""
  arrays, geoms = {}, {}
  for mod, src in subject["volumes"].items():
    arrays[mod], geoms[mod] = nifti.load_volume(src)
  nifti.check_same_grid([(subject["volumes"][m], geoms[m]) for m in arrays])
  entry = {"id": subject["subject"], "split": subject["split"],
           "shape": list(next(iter(arrays.values())).shape), "volumes": {}}
  fitted = _fit_presets(specs, arrays, subject["volumes"], train_fitted)
  for mod in [m for m in specs if m in arrays]:  # a test subject may lack some modalities
    preset = fitted[mod]
    entry["volumes"][mod] = {
        "path": f"{VOLUMES}/{subject['subject']}/{mod}.zarr",
        "source": subject["volumes"][mod],
        "geometry": geoms[mod].to_dict(),
        "preset": preset.to_dict(),
        "stats": _stats(arrays[mod]),
    }
  return entry


def _zarr_spec(path: str) -> dict[str, Any]:
  return {"driver": "zarr", "kvstore": {"driver": "file", "path": path}}


def _write_zarr(path: str, data: np.ndarray) -> None:
  """Writes `data` as a zarr array at `path`, atomically (temporary folder, then rename)."""
  def fill(tmp):
    spec = _zarr_spec(tmp)
    spec.update(create=True, delete_existing=True, metadata={
        "dtype": "<f4", "shape": list(data.shape),
        "chunks": [min(CHUNK, s) for s in data.shape], "compressor": _COMPRESSOR})
    arr = ts.open(spec).result()
    arr.write(data).result()
  # An existing `path` is replaced: a rename landed but the crash came before the partial
  # manifest recorded it.
  fileio.write_dir_atomic(path, fill)


def _write_json(path: str, obj: Any) -> None:
  fileio.write_text_atomic(path, json.dumps(obj, indent=1), fsync=True)


def convert(datalist_path: str | os.PathLike, out_dir: str | os.PathLike,
            presets: Mapping[str, Any], overwrite: bool = False,
            dataroot: str | os.PathLike | None = None) -> dict[str, Any]:
  """Converts the NIfTI volumes of a datalist into a store (see the module docstring for rules).

  Args:
    datalist_path: CSV or JSON datalist (`read_datalist`).
    out_dir: the store folder.
    presets: {modality: {"kind": 'ct'|'pet'|'mri'|'identity', "ref": other modality (optional),
      **fit_preset keywords}} or {modality: kind}. With "ref", the modality takes the ref
      modality's fitted preset (its own keywords override it), so e.g. low- and full-count PET of
      a subject share one scale, also when the ref's preset has a cap.
    overwrite: replace an existing store (its manifest, partial manifest and volumes folder; other
      files in `out_dir` are left alone). Without it an existing complete store is an error.
    dataroot: folder of the datalist's relative paths (`read_datalist`).

  Returns:
    The manifest dict (also written to out_dir/manifest.json).

  Raises:
    VolumeError: a bad datalist or input volume (named in the message); nothing is written.
    FileExistsError: `out_dir` already holds a store, or unrelated files, and overwrite is False.
    ValueError: bad preset specs, or a partial conversion with different settings.
  """
  datalist_path = os.path.abspath(os.fspath(datalist_path))
  out_dir = os.path.abspath(os.fspath(out_dir))
  subjects = read_datalist(datalist_path, dataroot=dataroot)
  modalities = _datalist_modalities(subjects)  # A test subject may lack some (e.g. the target).
  specs = _normalise_specs(presets, modalities)
  manifest_path = os.path.join(out_dir, MANIFEST)
  partial_path = os.path.join(out_dir, PARTIAL)
  volumes_dir = os.path.join(out_dir, VOLUMES)

  # Decide what to do with an existing out_dir before reading any volume.
  done: dict[str, dict] = {}
  if os.path.exists(out_dir) and not overwrite:
    if not os.path.isdir(out_dir):
      raise FileExistsError(f"{out_dir}: exists and is not a folder")
    if os.path.exists(manifest_path):
      raise FileExistsError(f"{out_dir}: already holds a converted store ({MANIFEST}); "
                            "pass overwrite=True to replace it")
    if os.path.exists(partial_path):
      with open(partial_path) as f:
        partial = json.load(f)
      same_specs = partial.get("presets") == json.loads(json.dumps(specs))
      if partial.get("modalities") != modalities or not same_specs:
        raise ValueError(f"{partial_path}: an interrupted conversion with other modalities or "
                         "presets; pass overwrite=True to start again")
      by_id = {s["subject"]: s for s in subjects}
      for entry in partial.get("subjects", []):
        subj = by_id.get(entry["id"])
        sources = {m: v["source"] for m, v in entry["volumes"].items()}
        if subj is None or subj["volumes"] != sources or subj["split"] != entry["split"]:
          raise ValueError(f"{partial_path}: finished subject {entry['id']!r} does not match the "
                           "datalist; pass overwrite=True to start again")
        done[entry["id"]] = entry
    elif os.listdir(out_dir):
      raise FileExistsError(f"{out_dir}: exists, is not empty and is not a store; "
                            "choose a new folder or pass overwrite=True")

  # Check every remaining input before the first write (fit=train scales first: they are
  # the same for every subject, and a resumed conversion keeps the ones it started with).
  if done and "fitted" in partial:
    train_fitted = {m: presets_lib.Preset.from_dict(p)
                    for m, p in partial.get("fitted", {}).items()}
  else:
    train_fitted = _fit_on_training_split(subjects, specs)
  plans = [_plan_subject(s, specs, train_fitted) for s in subjects if s["subject"] not in done]

  had_partial = bool(done)
  created_dir = not os.path.exists(out_dir)
  header = {"version": VERSION, "modalities": modalities, "presets": specs,
            "fitted": {m: p.to_dict() for m, p in train_fitted.items()}}
  current = None  # The subject being written, whose volumes an error must remove.
  try:
    if overwrite and not created_dir:
      for p in (manifest_path, partial_path):
        if os.path.exists(p):
          os.remove(p)
      shutil.rmtree(volumes_dir, ignore_errors=True)
    os.makedirs(volumes_dir, exist_ok=True)
    finished = list(done.values())
    _write_json(partial_path, dict(header, subjects=finished))
    for entry in plans:
      current = entry
      for mod, vol in entry["volumes"].items():
        arr, _ = nifti.load_volume(vol["source"])
        preset = presets_lib.Preset.from_dict(vol["preset"])
        _write_zarr(os.path.join(out_dir, vol["path"]),
                    np.asarray(preset.forward(arr), dtype=np.float32))
      finished.append(entry)
      _write_json(partial_path, dict(header, subjects=finished))
      current = None
    by_id = {e["id"]: e for e in finished}
    manifest = dict(header, subjects=[by_id[s["subject"]] for s in subjects])
    _write_json(manifest_path, manifest)
    os.remove(partial_path)
  except Exception:
    # An error (not an interrupt): remove what this call wrote, but keep the subjects an earlier,
    # interrupted call finished (and those finished since, which the partial manifest lists).
    if not had_partial:
      if created_dir:
        shutil.rmtree(out_dir, ignore_errors=True)
      else:
        shutil.rmtree(volumes_dir, ignore_errors=True)
        for p in (partial_path, manifest_path):
          if os.path.exists(p):
            os.remove(p)
    elif current is not None:
      shutil.rmtree(os.path.join(volumes_dir, current["id"]), ignore_errors=True)
    raise
  return manifest


# ----------------------------------------------------------------------------------------------
# Reading.


_WARNED: set[int] = set()


class Store:
  """Read access to a converted store.

  Picklable and cheap to pickle (only the path travels): Grain worker processes re-read the
  manifest and open their own tensorstore handles on first use.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.path.abspath(os.fspath(path))
    manifest_path = os.path.join(self.path, MANIFEST)
    if not os.path.isfile(manifest_path):
      hint = " (conversion interrupted: run convert again to resume)" if os.path.exists(
          os.path.join(self.path, PARTIAL)) else ""
      raise VolumeError(f"{manifest_path}: not found, {self.path} is not a converted store{hint}")
    try:
      with open(manifest_path) as f:
        self.manifest = json.load(f)
    except ValueError as e:
      raise VolumeError(f"{manifest_path}: not valid JSON ({e})") from e
    version = self.manifest.get("version")
    if version not in READS:
      raise VolumeError(f"{manifest_path}: manifest version {version!r}, this code reads "
                        f"versions {READS}")
    if version == 1 and os.getpid() not in _WARNED:
      _WARNED.add(os.getpid())
      log.warning("%s: converted before presets were fitted on the training split: percentile "
                  "presets were fitted on each volume itself, so evaluation refuses a target "
                  "whose scale came from its own volume; reconvert (tools/convert.py or "
                  "tools/prepare_data.py with --overwrite) to evaluate on it", self.path)
    self._by_id = {s["id"]: s for s in self.manifest["subjects"]}
    self._handles: dict[tuple[str, str], Any] = {}
    self._pid = os.getpid()

  def __getstate__(self):
    return {"path": self.path}

  def __setstate__(self, state):
    self.__init__(state["path"])

  def __repr__(self) -> str:
    return f"Store({self.path!r})"

  @property
  def modalities(self) -> list[str]:
    return list(self.manifest["modalities"])

  def preset_spec(self, modality: str) -> dict[str, Any]:
    """The conversion's preset spec of a modality ({"kind", "ref"?, "fit"?, keywords}); for a
    version-1 store a percentile preset without ref reads as fit=volume (what it was)."""
    specs = self.manifest.get("presets", {})
    if modality not in specs:
      raise KeyError(f"{self.path}: no modality {modality!r} (has {self.modalities})")
    spec = dict(specs[modality])
    if (self.manifest.get("version") == 1 and spec.get("ref") is None
        and presets_lib.depends_on_volume(spec["kind"], _kw(spec))):
      spec["fit"] = "volume"
    return spec

  def fitted_preset(self, modality: str) -> presets_lib.Preset | None:
    """The training-split preset of a fit=train modality (None for other modalities)."""
    p = self.manifest.get("fitted", {}).get(modality)
    return None if p is None else presets_lib.Preset.from_dict(p)

  def subjects(self, split: str | None = None) -> list[dict[str, Any]]:
    """Manifest entries of all subjects, or of one split, in manifest order."""
    if split is not None and split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    return [s for s in self.manifest["subjects"] if split is None or s["split"] == split]

  def _entry(self, subject_id: str, modality: str) -> dict[str, Any]:
    try:
      subject = self._by_id[subject_id]
    except KeyError:
      raise KeyError(f"{self.path}: no subject {subject_id!r}") from None
    try:
      return subject["volumes"][modality]
    except KeyError:
      raise KeyError(f"{self.path}: subject {subject_id!r} has no modality {modality!r} "
                     f"(has {sorted(subject['volumes'])})") from None

  def shape(self, subject_id: str) -> tuple[int, int, int]:
    """RAS shape of a subject's volumes."""
    if subject_id not in self._by_id:
      raise KeyError(f"{self.path}: no subject {subject_id!r}")
    return tuple(self._by_id[subject_id]["shape"])

  def preset(self, subject_id: str, modality: str) -> presets_lib.Preset:
    return presets_lib.Preset.from_dict(self._entry(subject_id, modality)["preset"])

  def geometry(self, subject_id: str, modality: str) -> nifti.Geometry:
    return nifti.Geometry.from_dict(self._entry(subject_id, modality)["geometry"])

  def _handle(self, subject_id: str, modality: str):
    if self._pid != os.getpid():
      # Handles opened before a fork belong to the parent's threads: reopen in this process.
      self._handles, self._pid = {}, os.getpid()
    key = (subject_id, modality)
    if key not in self._handles:
      path = os.path.join(self.path, self._entry(subject_id, modality)["path"])
      self._handles[key] = ts.open(_zarr_spec(path), open=True, read=True).result()
    return self._handles[key]

  def read(self, subject_id: str, modality: str,
           box: Sequence[tuple[int, int] | slice] | None = None) -> np.ndarray:
    """Reads a volume (network range, RAS), or only the sub-box `box` of it.

    Args:
      subject_id: subject id.
      modality: modality name.
      box: 3 (start, stop) pairs or slices (step 1) inside the volume; only the chunks it
        overlaps are read.

    Returns:
      float32 array.
    """
    handle = self._handle(subject_id, modality)
    if box is None:
      return np.asarray(handle.read().result())
    shape = self.shape(subject_id)
    if len(box) != 3:
      raise ValueError(f"box must have 3 entries, got {box!r}")
    slices = []
    for axis, b in enumerate(box):
      if isinstance(b, slice):
        if b.step not in (None, 1):
          raise ValueError(f"box slices must have step 1, got {b!r}")
        start, stop = b.start or 0, shape[axis] if b.stop is None else b.stop
      else:
        start, stop = b
      if not 0 <= start < stop <= shape[axis]:
        raise ValueError(f"box axis {axis} = ({start}, {stop}) is outside the volume shape {shape}")
      slices.append(slice(int(start), int(stop)))
    return np.asarray(handle[tuple(slices)].read().result())
