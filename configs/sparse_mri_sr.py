"""Sparse voxel-space diffusion with STM for MRI super-resolution (thick-slice T1 -> T1, x2 or x4).

Data: a store with the thick-slice input `t1_x2` (or `t1_x4`) and the target `t1`. With your own
subjects, whole volumes of the `train` split train and whole volumes of the `test` split are
scored:
  python -m jaxvol.main --config=configs/sparse_mri_sr.py --workdir=runs/sparse_mri_sr \
      --config.data.store=STORE
The repository's data is the stroke T1 with simulated thick slices along z
(jaxvol.data.degrade.simulate_low_resolution):
  python tools/prepare_data.py --task mri_sr --out data/mri_sr
One subject, so it needs the token `heldout`: training crops from one hemisphere (RAS x in
[0, 0.5)), evaluation on the other (split `train`). Variant tokens pick the factor: `x2`
(default) or `x4`, e.g. --config=configs/sparse_mri_sr.py:x4,cpu,heldout
  python -m jaxvol.main --config=configs/sparse_mri_sr.py:heldout --workdir=runs/sparse_mri_sr \
      --config.data.store=data/mri_sr/store
  python -m jaxvol.main --config=configs/sparse_mri_sr.py:heldout --workdir=runs/sparse_mri_sr \
      --config.data.store=data/mri_sr/store --mode=evaluate
Variants: `smoke` (seconds on CPU), `cpu` (an 8-wide U-Net, 16^3 patches, 10 minutes on 2 CPU
cores); no variant is the paper's network (width 64, 5 levels, attention at 1/8) for accelerators.
Every variant uses the authors' U-Net layout (`--config.model.layout=jaxvol` for jaxvol's; the
authors' measured better); `authors` also switches to their sampler (11 evaluations) and training
recipe (no clipping or warm-up, float32, a 50%-overlap patch grid without flips, raw weights at
evaluation) and combines with the others, e.g.
--config=configs/sparse_mri_sr.py:authors,cpu,heldout
(`whole`, the default, may be named.)
"""

# The code lives in jaxvol.configs, where an installed jaxvol finds it by name
# (`jaxvol train --config=sparse_mri_sr`); this file keeps the path form working.
from jaxvol.configs.sparse_mri_sr import get_config  # noqa: F401
