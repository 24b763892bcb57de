"""Sparse voxel-space diffusion with STM for low-count PET denoising.

Data: a store with modalities `pet_low` and `pet_full` sharing one scale. With your own
subjects, whole volumes of the `train` split train and whole volumes of the `test` split are
scored:
  python -m jaxvol.main --config=configs/sparse_pet_denoise.py --workdir=runs/sparse_pet_denoise \
      --config.data.store=STORE
The repository's data: PET phantom pairs whose test subjects share the training subjects' anatomy
(new noise only):
  python tools/prepare_data.py --task pet_denoise --out data/pet_denoise
so it needs the token `heldout`: training crops from RAS z in [0, 0.6), evaluation on [0.6, 1] of
the test subjects:
  python -m jaxvol.main --config=configs/sparse_pet_denoise.py:heldout \
      --workdir=runs/sparse_pet_denoise --config.data.store=data/pet_denoise/store
  python -m jaxvol.main --config=configs/sparse_pet_denoise.py:heldout \
      --workdir=runs/sparse_pet_denoise --config.data.store=data/pet_denoise/store --mode=evaluate
Variants: `smoke` (seconds on CPU), `cpu` (an 8-wide U-Net, 16^3 patches, 10 minutes on 2 CPU
cores); no variant is the paper's network (width 64, 5 levels, attention at 1/8) for accelerators.
Every variant uses the authors' U-Net layout (`--config.model.layout=jaxvol` for jaxvol's; the
authors' measured better); `authors` also switches to their sampler (11 evaluations) and training
recipe (no clipping or warm-up, float32, a 50%-overlap patch grid without flips, raw weights at
evaluation, 96^3 patches) and combines with the others, e.g.
--config=configs/sparse_pet_denoise.py:authors,cpu,heldout
(`whole`, the default, may be named.)
"""

# The code lives in jaxvol.configs, where an installed jaxvol finds it by name
# (`jaxvol train --config=sparse_pet_denoise`); this file keeps the path form working.
from jaxvol.configs.sparse_pet_denoise import get_config  # noqa: F401
