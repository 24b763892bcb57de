"""PPDM for joint PET denoising and attenuation correction.

Input: low-count, non-attenuation-corrected PET (`pet_nac_low`); target: full-count
attenuation-corrected PET (`pet_ac`). The NAC input is simulated from PET and an attenuation map
(jaxvol.data.degrade.simulate_nac_pet documents the physics), then Poisson-thinned, e.g. from the
SPM PET and transmission templates:
  python tools/prepare_data.py --task pet_ac --out data/pet_ac
Launch:
  python -m jaxvol.main --config=configs/ppdm_pet_ac.py --workdir=runs/ppdm_pet_ac \
      --config.data.store=data/pet_ac/store
Variant `smoke` runs in seconds on CPU.
"""

from jaxvol import config as base


def get_config(variant: str | None = None):
  c = base.base_config()
  c.method = "ppdm"
  c.data.inputs = ("pet_nac_low",)
  c.data.target = "pet_ac"
  c.data.crop_size = (64, 64, 64)
  c.model.base_width = 32
  c.model.channel_mults = (1, 2, 4)
  c.model.num_res_blocks = 2
  c.ppdm.factor = (2, 2, 2)
  c.eval.input_baseline = True  # the NAC input, on the AC target's scale, is the naive floor
  if variant == "smoke":
    base.smoke_overrides(c)
  elif variant not in (None, ""):
    raise ValueError(f"unknown variant {variant!r}: use smoke")
  return c
