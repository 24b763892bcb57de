"""How each modality's intensity preset is known at inference, without any ground truth.

A prediction is normalised with the input's preset and mapped back to original units with the
target's. Both must be known from what inference has: the input volumes, and what training saved.
A *rule* says how (JSON, saved in every checkpoint's metadata as "inference_presets"):

  {"rule": "fixed", "preset": {...}}   lo/hi independent of any evaluated volume: a CT window, a
                                       PET cap, explicit lo/hi, or a preset fitted on the
                                       training split (store spec fit=train)
  {"rule": "ref", "ref": M, "spec": {...}}
                                       the preset of modality M (an input) for the same subject,
                                       with the spec's own keywords overriding it (store spec ref=M)
  {"rule": "volume", "spec": {...}}    fitted on this modality's own volume (store spec fit=volume,
                                       or a percentile preset of a version-1 store): allowed for
                                       inputs only

`check_rules` refuses a target (or an input) whose rule needs a volume inference does not have,
naming how to reconvert. `resolve` gives a subject's preset from the rules and the inputs of any
store, with or without the target, so evaluation and sampling compute the same prediction.
`shares_scale` decides whether the input itself is a fair baseline for the target (same units).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from jaxvol.data import presets as presets_lib

_SCALE_KEYS = ("lo", "hi", "cap", "percentile", "lower", "upper")


def rule_of(store, modality: str) -> dict[str, Any]:
  """The inference rule of one modality of a store (module docstring)."""
  spec = store.preset_spec(modality)
  kw = {k: v for k, v in spec.items() if k not in ("kind", "ref", "fit")}
  if spec.get("ref") is not None:
    return {"rule": "ref", "ref": spec["ref"], "spec": spec}
  if spec.get("fit") == "train":
    fitted = store.fitted_preset(modality)
    if fitted is None:
      raise ValueError(f"{store.path}: modality {modality!r} is fit=train but the manifest has no "
                       "fitted preset for it; reconvert the store")
    return {"rule": "fixed", "preset": fitted.to_dict(), "spec": spec}
  if spec.get("fit") == "volume" or presets_lib.depends_on_volume(spec["kind"], kw):
    return {"rule": "volume", "spec": spec}
  return {"rule": "fixed", "preset": presets_lib.fit_preset(spec["kind"], None, **kw).to_dict(),
          "spec": spec}


def rules_of(store, inputs: Sequence[str], target: str | None) -> dict[str, dict]:
  """Rules of the inputs and the target (and of any modality a ref points at)."""
  mods = list(inputs) + ([target] if target else [])
  rules = {}
  while mods:
    m = mods.pop(0)
    if m in rules:
      continue
    rules[m] = rule_of(store, m)
    if rules[m]["rule"] == "ref":
      mods.append(rules[m]["ref"])
  return rules


def _known_at_inference(m: str, rules: Mapping[str, dict], inputs: Sequence[str]) -> bool:
  rule = rules[m]
  if rule["rule"] == "fixed":
    return True
  if rule["rule"] == "volume":
    return m in inputs
  return _known_at_inference(rule["ref"], rules, inputs)


def check_rules(rules: Mapping[str, dict], inputs: Sequence[str], target: str | None,
                where: str) -> None:
  """Raises ValueError when a modality's preset would need a volume inference lacks.

  Args:
    rules: from `rules_of` (or a checkpoint's "inference_presets").
    inputs: the conditioning modalities (inference has them).
    target: the predicted modality (inference does not have it), or None.
    where: the store or checkpoint, for the message.
  """
  for m in list(inputs) + ([target] if target else []):
    if not _known_at_inference(m, rules, inputs):
      chain = m
      while rules[chain]["rule"] == "ref":
        chain = rules[chain]["ref"]
      raise ValueError(
          f"{where}: the intensity preset of {m!r} is fitted on each {chain!r} volume itself "
          f"({'the target' if chain == target else 'not an input'}), so a prediction would read "
          "the ground truth to set its scale. Reconvert the store so that its scale comes from "
          "the training split (fit=train, the default for percentile presets since store "
          f"version 2), from fixed values (lo/hi, a PET cap) or from an input (ref=INPUT): "
          "tools/convert.py ... --overwrite, or tools/prepare_data.py --task TASK --overwrite; "
          "then retrain, as the network learned the old scale")


def resolve(rules: Mapping[str, dict], modality: str, store, subject_id: str,
            _seen: tuple = ()) -> presets_lib.Preset:
  """The preset of `modality` for one subject of `store`, from the rules (no target read).

  "volume" rules read the modality's preset from the store (it was fitted on that volume, which
  inference has: an input); "ref" rules start from the ref's resolved preset and refit only what
  the spec's own keywords set, reading the ref volume where a keyword is a percentile.
  """
  if modality in _seen:
    raise ValueError(f"preset refs form a cycle: {_seen + (modality,)}")
  rule = rules[modality]
  if rule["rule"] == "fixed":
    return presets_lib.Preset.from_dict(rule["preset"])
  if rule["rule"] == "volume":
    return store.preset(subject_id, modality)
  ref = rule["ref"]
  base = resolve(rules, ref, store, subject_id, _seen + (modality,))
  spec = rule["spec"]
  kw = {k: v for k, v in spec.items() if k not in ("kind", "ref", "fit")}
  scale = {"lo": base.lo, "hi": base.hi}
  if {"hi", "cap", "percentile", "upper"} & set(kw):
    del scale["hi"]
  if {"lo", "lower"} & set(kw):
    del scale["lo"]
  kw = {**scale, **kw}
  volume = None
  if presets_lib.depends_on_volume(spec["kind"], kw):
    volume = base.inverse(store.read(subject_id, ref))  # the ref (an input) in raw units
  return presets_lib.fit_preset(spec["kind"], volume, **kw)


def resolve_raw(rules: Mapping[str, dict], modality: str, raw: Mapping[str, np.ndarray],
                _seen: tuple = ()) -> presets_lib.Preset:
  """`resolve` for volumes held in memory in original units (a user's NIfTI files, no store):
  "volume" rules fit the preset on `raw[modality]` itself (an input), "ref" rules start from the
  ref's preset and refit only what the spec's own keywords set."""
  if modality in _seen:
    raise ValueError(f"preset refs form a cycle: {_seen + (modality,)}")
  rule = rules[modality]
  spec = rule.get("spec", {})
  kw = {k: v for k, v in spec.items() if k not in ("kind", "ref", "fit")}
  if rule["rule"] == "fixed":
    return presets_lib.Preset.from_dict(rule["preset"])
  if rule["rule"] == "volume":
    if modality not in raw:
      raise ValueError(f"the preset of {modality!r} is fitted on its own volume, which is not "
                       "among the inputs")
    return presets_lib.fit_preset(spec["kind"], raw[modality], **kw)
  ref = rule["ref"]
  base = resolve_raw(rules, ref, raw, _seen + (modality,))
  scale = {"lo": base.lo, "hi": base.hi}
  if {"hi", "cap", "percentile", "upper"} & set(kw):
    del scale["hi"]
  if {"lo", "lower"} & set(kw):
    del scale["lo"]
  kw = {**scale, **kw}
  volume = raw.get(ref) if presets_lib.depends_on_volume(spec["kind"], kw) else None
  return presets_lib.fit_preset(spec["kind"], volume, **kw)


def shares_scale(rules: Mapping[str, dict], inp: str, target: str) -> bool:
  """True when the input's original units are the target's: the target takes the input's scale
  (ref=input, no own scale keywords), or both are the same fixed map (identical presets), or both
  are CT windows (Hounsfield units are absolute, whatever the window or ref)."""
  t, i = rules[target], rules[inp]
  if t["rule"] == "ref" and t["ref"] == inp:
    if not set(_SCALE_KEYS) & set(t["spec"]):
      return True
    # Its own scale keywords: the same units only where both are CT windows (absolute HU).
    return t["spec"].get("kind") == "ct" and i["rule"] == "fixed" and i["preset"]["name"] == "ct"
  if t["rule"] == "fixed" and i["rule"] == "fixed":
    pt, pi = t["preset"], i["preset"]
    return pt["name"] == pi["name"] and (pt["name"] == "ct" or (
        np.isclose(pt["lo"], pi["lo"]) and np.isclose(pt["hi"], pi["hi"])))
  return False


def describe(rules: Mapping[str, dict]) -> dict[str, str]:
  """One line per modality, for summaries."""
  out = {}
  for m, r in rules.items():
    if r["rule"] == "fixed":
      p = r["preset"]
      how = "fitted on the training split" if r.get("spec", {}).get("fit") == "train" else "fixed"
      out[m] = f"{p['name']} [{p['lo']:.6g}, {p['hi']:.6g}] ({how})"
    elif r["rule"] == "ref":
      out[m] = f"the scale of {r['ref']!r} for the same subject"
    else:
      out[m] = "fitted on each volume itself (an input)"
  return out
