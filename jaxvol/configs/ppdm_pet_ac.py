"""PPDM for joint PET denoising and attenuation correction.

Input: low-count, non-attenuation-corrected PET (`pet_nac_low`); target: full-count
attenuation-corrected PET (`pet_ac`). With your own subjects (a store with these modalities),
whole volumes of the `train` split train and whole volumes of the `test` split are scored:
  python -m jaxvol.main --config=configs/ppdm_pet_ac.py --workdir=runs/ppdm_pet_ac \
      --config.data.store=STORE
The repository's data: the NAC input simulated from PET and an attenuation map as Poisson counts
on the attenuated sinogram reconstructed without attenuation correction
(jaxvol.data.degrade.simulate_low_count_pet documents the physics), from the SPM PET and
transmission templates:
  python tools/prepare_data.py --task pet_ac --out data/pet_ac
  python -m jaxvol.main --config=configs/ppdm_pet_ac.py:heldout --workdir=runs/ppdm_pet_ac \
      --config.data.store=data/pet_ac/store
Split `heldout` (needed there): one anatomy for every subject, so training crops come from RAS z
in [0, 0.6) and evaluation from [0.6, 1] of the test subject (jaxvol.data.tasks). The NAC
input and the AC target have different scales (the input is not a prediction of the target), so
no input baseline is scored: the floor is the training-target mean that evaluation always
reports.
Variants (comma-separated tokens): `smoke` (seconds on CPU); `cpu` (32^3 crops, a 16-wide U-Net,
about 10 minutes of training on 2 CPU cores: `base.demo_overrides`); `heldout`; `whole` (the
default, named); `fullvolume` (train on WHOLE volumes, under `heldout` the whole training region,
edge-padded to the spatial multiple instead of random crops, and sample in one pass:
`base.apply_fullvolume`; training sets crop_size to the padded region from the store,
`jaxvol.train.loop.resolve_whole_crop`; not `whole`, which names the split).
E.g. :cpu,heldout
"""

from jaxvol import config as base


def get_config(variant: str | None = None):
  tokens = base.variant_tokens(variant, ("smoke", "cpu", base.FULLVOLUME) + base.SPLIT_TOKENS,
                               [("smoke", "cpu")])
  c = base.base_config()
  c.method = "ppdm"
  c.data.inputs = ("pet_nac_low",)
  c.data.target = "pet_ac"
  c.data.crop_size = (64, 64, 64)
  c.model.base_width = 32
  c.model.channel_mults = (1, 2, 4)
  c.model.num_res_blocks = 2
  c.ppdm.factor = (2, 2, 2)
  base.apply_split(c, "pet_ac", base.HELDOUT in tokens)
  base.clamp_for_preset(c, "pet")  # for the baselines that clamp x0 (PPDM does not)
  c.eval.input_baseline = False  # NAC units are not AC units (jaxvol.data.inference.shares_scale)
  if "smoke" in tokens:
    base.smoke_overrides(c)
  elif "cpu" in tokens:
    base.demo_overrides(c)
  if base.FULLVOLUME in tokens:
    base.apply_fullvolume(c)
  return c
