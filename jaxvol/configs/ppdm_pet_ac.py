"""PPDM for joint PET denoising and attenuation correction.

Input: low-count, non-attenuation-corrected PET (`pet_nac_low`); target: full-count
attenuation-corrected PET (`pet_ac`). The NAC input is simulated from PET and an attenuation map
as Poisson counts on the attenuated sinogram reconstructed without attenuation correction
(jaxvol.data.degrade.simulate_low_count_pet documents the physics), e.g. from the
SPM PET and transmission templates:
  python tools/prepare_data.py --task pet_ac --out data/pet_ac
Launch:
  python -m jaxvol.main --config=configs/ppdm_pet_ac.py --workdir=runs/ppdm_pet_ac \
      --config.data.store=data/pet_ac/store
Split: one anatomy, so training crops come from RAS z in [0, 0.6) and evaluation from [0.6, 1]
of the test subject (`base.pet_regions`). The NAC input and the AC target have different scales
(the input is not a prediction of the target), so no input baseline is scored: the floor is the
training-target mean that evaluation always reports.
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
  c.data.train_region, c.data.eval_region = base.pet_regions()
  base.clamp_for_preset(c, "pet")  # for the baselines that clamp x0 (PPDM does not)
  c.eval.input_baseline = False  # NAC units are not AC units (jaxvol.data.inference.shares_scale)
  if variant == "smoke":
    base.smoke_overrides(c)
  elif variant not in (None, ""):
    raise ValueError(f"unknown variant {variant!r}: use smoke")
  return c
