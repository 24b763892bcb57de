"""PPDM for low-count PET denoising: low-count PET -> full-count PET (puzzle factor 2).

Data: a store with modalities `pet_low` and `pet_full` sharing one intensity scale, e.g.
  python tools/convert.py --datalist list.csv --out STORE --preset pet_low=pet \
      --preset pet_full=pet:ref=pet_low
Launch:
  python -m jaxvol.main --config=configs/ppdm_pet_denoise.py --workdir=runs/ppdm_pet \
      --config.data.store=STORE
  python -m jaxvol.main --config=configs/ppdm_pet_denoise.py --workdir=runs/ppdm_pet \
      --config.data.store=STORE --mode=evaluate
Split: the stores this repository builds (tools/prepare_data.py --task pet_denoise, the demo's
phantom) give every subject the same anatomy, only the noise differs, so training crops come from
RAS z in [0, 0.6) and evaluation from [0.6, 1] of the test subjects: the evaluated anatomy is never
trained on (`base.PET_TRAIN_REGION`). With a store whose test subjects are other people, add the
variant token `whole` (train and evaluate whole volumes).
Variants (comma-separated tokens): `smoke` (seconds on CPU), `demo` (the README quick start: about
10 minutes on 2 CPU cores on the nilearn MNI152-based PET phantom), `whole`.
"""

# The code lives in jaxvol.configs, where an installed jaxvol finds it by name
# (`jaxvol train --config=ppdm_pet_denoise`); this file keeps the path form working.
from jaxvol.configs.ppdm_pet_denoise import get_config  # noqa: F401
