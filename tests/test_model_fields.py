"""Each method declares the config fields that define its model; checkpoints are checked on them.

jaxvol.methods.model_fields(config) is what jaxvol.train.checkpoint.check_same_model compares by
default when a checkpoint is resumed or evaluated.
"""

import importlib
import json
import re

import pytest

from jaxvol import config as base_config
from jaxvol import configs
from jaxvol import methods
from jaxvol.methods import prdit as prdit_method
from jaxvol.train import checkpoint as ckpt_lib

# One packaged config per method; a method without one is checked on the base config (the
# defaults every config starts from).
CONFIG_OF = {"ppdm": "ppdm_pet_denoise", "full3d": "full3d_mri_t1_t2", "wdm": "wdm_mri_t1_t2",
             "regression": "regression_mri_t1_t2", "sparse": "sparse_ct_denoise",
             "prdit": "prdit_ct_gen"}

# Written from reading each method, independently of its declaration: fields a changed value of
# which must be refused, and fields that must not matter to it.
EXPECTED = {
    "ppdm": (["method", "ppdm.factor", "ppdm.num_steps", "ppdm.max_var", "model.base_width",
              "model.channel_mults", "data.inputs", "data.target", "compute_dtype",
              "model.residual"],
             ["diffusion.beta_end", "diffusion.num_steps", "diffusion.parameterization",
              "ppdm.sample_steps", "ppdm.eta", "ppdm.loss", "model.dropout", "model.remat",
              "train.learning_rate", "wdm.lll_scale", "prdit.depth", "model.stm"]),
    "full3d": (["diffusion.num_steps", "diffusion.beta_start", "diffusion.beta_end",
                "diffusion.parameterization", "model.stm", "model.time_embed_dim"],
               ["ppdm.factor", "ppdm.max_var", "wdm.lll_scale", "diffusion.sample_steps",
                "diffusion.clip_x0", "sparse.f_steps", "prdit.stride"]),
    "wdm": (["wdm.lll_scale", "diffusion.beta_end", "model.layout"],
            ["ppdm.num_steps", "diffusion.eta", "sparse.timesteps", "model.residual"]),
    "regression": (["model.base_width", "model.groups", "data.inputs", "data.target",
                    "model.residual"],
                   ["diffusion.beta_end", "diffusion.num_steps", "ppdm.factor", "model.stm",
                    "regression.loss"]),
    "sparse": (["model.stm", "model.stm_dim", "diffusion.parameterization", "sparse.f_steps",
                "sparse.levels", "model.num_heads", "model.attention_levels", "model.residual"],
               ["sparse.sampler", "sparse.heun", "sparse.final_denoise", "ppdm.factor",
                "wdm.lll_scale", "inference.window"]),
    "puzzle_regression": (["ppdm.factor", "model.base_width", "data.inputs", "model.residual"],
                          ["ppdm.num_steps", "ppdm.max_var", "diffusion.beta_end", "model.stm"]),
    "prdit": (["prdit.layout", "prdit.stride", "prdit.patch", "prdit.depth", "prdit.sigma",
               "prdit.stage", "prdit.local_blocks", "data.target"],
              ["model.base_width", "data.inputs", "prdit.sample_steps", "prdit.sampler",
               "prdit.attention", "prdit.remat", "diffusion.beta_end", "prdit.stage1_workdir"]),
}


def _packaged(name, variant=None):
  return importlib.import_module(f"jaxvol.configs.{name}").get_config(variant)


def _config_for(method):
  if method in CONFIG_OF:
    return _packaged(CONFIG_OF[method])
  c = base_config.base_config()
  c.method = method
  return c


def _tree(config):
  return json.loads(config.to_json_best_effort())


def _lookup(tree, dotted):
  """(found, value) of a dotted field in a JSON tree."""
  for part in dotted.split("."):
    if not isinstance(tree, dict) or part not in tree:
      return False, None
    tree = tree[part]
  return True, tree


def _other(value):
  """A different value of the same kind."""
  if isinstance(value, bool):
    return not value
  if isinstance(value, (int, float)):
    return value + 1
  if isinstance(value, str):
    return value + "_other"
  if isinstance(value, list):
    return value + [value[-1] if value else 1]
  raise TypeError(f"no other value for {value!r}")


def _saved_with(config, field):
  """Checkpoint metadata of `config` trained with `field` changed."""
  saved = _tree(config)
  *parents, leaf = field.split(".")
  node = saved
  for part in parents:
    node = node[part]
  node[leaf] = _other(node[leaf])
  return {"config": saved}


def _refused(config, field):
  with pytest.raises(ValueError, match=re.escape(field) + " saved .* vs now"):
    ckpt_lib.check_same_model(_saved_with(config, field), config, "/runs/x")


def _accepted(config, field):
  ckpt_lib.check_same_model(_saved_with(config, field), config, "/runs/x")


def test_every_declared_field_exists_in_the_methods_packaged_configs():
  """A misspelled declaration would never be compared (absent fields are skipped): each field a
  method declares must hold a value in every packaged config of that method (the base config
  for a method without one)."""
  checked = [(name, variant, _packaged(name, variant)) for name in configs.names()
             for variant in (None, "smoke")]
  checked += [("base_config", None, _config_for(m)) for m in methods.METHODS
              if m not in CONFIG_OF]
  for name, variant, config in checked:
    tree = _tree(config)
    for field in methods.method_class(config).MODEL_FIELDS:
      found, value = _lookup(tree, field)
      assert found and value is not None, (name, variant, field)
  assert all(_packaged(name).method == m for m, name in CONFIG_OF.items())
  declared = {f for cls in methods.METHODS.values() for f in cls.MODEL_FIELDS}
  for cls in methods.METHODS.values():
    assert set(cls.SWITCHED_FIELDS) <= declared, cls  # a misspelled switch would never apply
  # A stage-2 run checks these against its stage-1 source: they define the stage-1 model too.
  assert set(prdit_method.LOCAL_FIELDS) <= set(prdit_method.PRDiT.MODEL_FIELDS)


@pytest.mark.parametrize("method", sorted(methods.METHODS))
def test_changing_a_declared_field_is_refused_with_its_name(method):
  config = _config_for(method)
  declared = methods.model_fields(config)
  assert declared[0] == "method" and len(set(declared)) == len(declared)
  refused, accepted = EXPECTED.get(method, ([], []))
  assert set(refused) <= set(declared) and not set(accepted) & set(declared)
  for field in declared:
    _refused(config, field)
  if method == "prdit":  # a stage-1 config declares its own fields
    stage1 = _packaged("prdit_ct_gen", "stage1")
    for field in methods.model_fields(stage1):
      _refused(stage1, field)


@pytest.mark.parametrize("method", sorted(methods.METHODS))
def test_fields_only_other_methods_use_are_accepted(method):
  config = _config_for(method)
  tree = _tree(config)
  declared = set(methods.model_fields(config))
  others = {f for cls in methods.METHODS.values() for f in cls.MODEL_FIELDS} - declared
  for field in sorted(others | set(EXPECTED.get(method, ([], []))[1])):
    found, value = _lookup(tree, field)
    if found and value is not None:
      _accepted(config, field)


def test_fields_switched_off_do_not_count():
  ppdm = _packaged("ppdm_pet_denoise", "smoke")
  assert not ppdm.data.position_channels and not ppdm.model.attention_levels
  _accepted(ppdm, "data.position_axes")
  _accepted(ppdm, "model.num_heads")
  ppdm.data.position_channels = True
  ppdm.model.attention_levels = (1,)
  _refused(ppdm, "data.position_axes")
  _refused(ppdm, "model.num_heads")
  _refused(ppdm, "data.position_channels")  # the switch itself always counts

  full3d = _packaged("full3d_mri_t1_t2", "smoke")
  _accepted(full3d, "model.stm_dim")
  full3d.model.stm = True
  _refused(full3d, "model.stm_dim")

  sparse = _packaged("sparse_ct_denoise", "smoke")
  _refused(sparse, "sparse.f_steps")
  sparse.sparse.timesteps = (0, 499, 999)
  _accepted(sparse, "sparse.f_steps")
  _accepted(sparse, "sparse.levels")
  _refused(sparse, "sparse.timesteps")

  stage1 = _packaged("prdit_ct_gen", "stage1,smoke")
  for field in ("prdit.depth", "prdit.heads", "prdit.mlp_ratio"):
    _accepted(stage1, field)
  _refused(_packaged("prdit_ct_gen", "smoke"), "prdit.depth")


def test_other_method_unknown_method_and_explicit_fields():
  ppdm = _packaged("ppdm_pet_denoise", "smoke")
  saved = _tree(ppdm)
  saved["method"] = "full3d"
  with pytest.raises(ValueError, match="method saved 'full3d' vs now 'ppdm'"):
    ckpt_lib.check_same_model({"config": saved}, ppdm, "/runs/x")
  unknown = ppdm.copy_and_resolve_references()
  unknown.method = "ppdmm"
  with pytest.raises(ValueError, match="unknown method 'ppdmm'"):
    methods.model_fields(unknown)
  with pytest.raises(ValueError, match="unknown method 'ppdmm'"):
    ckpt_lib.check_same_model({"config": _tree(ppdm)}, unknown, "/runs/x")
  # An explicit list (a parameter source's same_fields) replaces the method's.
  with pytest.raises(ValueError, match="diffusion.beta_end saved"):
    ckpt_lib.check_same_model(_saved_with(ppdm, "diffusion.beta_end"), ppdm, "/runs/x",
                              fields=("diffusion.beta_end",))
  ckpt_lib.check_same_model(_saved_with(ppdm, "ppdm.factor"), ppdm, "/runs/x",
                            fields=("diffusion.beta_end",))
  # 2, [2] and [2, 2, 2] are one puzzle factor.
  for saved_factor in (2, [2]):
    saved = _tree(ppdm)
    saved["ppdm"]["factor"] = saved_factor
    ckpt_lib.check_same_model({"config": saved}, ppdm, "/runs/x")


def test_model_fields_reads_the_config_without_building():
  config = _packaged("prdit_ct_gen", "smoke")
  config.prdit.stage = 3  # no network can be built from this
  with pytest.raises(ValueError, match="prdit.stage must be 1 or 2"):
    methods.build(config)
  assert "prdit.stage" in methods.model_fields(config)
