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
in [0, 0.6) and evaluation from [0.6, 1] of the test subject (`base.HELDOUT_SPLITS`). The NAC
input and the AC target have different scales (the input is not a prediction of the target), so
no input baseline is scored: the floor is the training-target mean that evaluation always
reports.
Variants (comma-separated tokens): `smoke` (seconds on CPU); `cpu` (32^3 crops, a 16-wide U-Net,
about 10 minutes of training on 2 CPU cores: `base.demo_overrides`); `heldout`; `whole` (the
default, named). E.g. :cpu,heldout
"""

# The code lives in jaxvol.configs, where an installed jaxvol finds it by name
# (`jaxvol train --config=ppdm_pet_ac`); this file keeps the path form working.
from jaxvol.configs.ppdm_pet_ac import get_config  # noqa: F401
