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

# The code lives in jaxvol.configs, where an installed jaxvol finds it by name
# (`jaxvol train --config=ppdm_pet_ac`); this file keeps the path form working.
from jaxvol.configs.ppdm_pet_ac import get_config  # noqa: F401
