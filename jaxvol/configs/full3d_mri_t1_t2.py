"""Full-resolution conditional 3D DDPM (the reference baseline) for MRI T1 -> T2 translation
(stroke volumes, hemisphere region split).

Data: a store with modalities `t1` and `t2` of one co-registered subject, e.g.
  python tools/prepare_data.py --task mri_t1_t2 --out data/mri_t1_t2
Launch:
  python -m jaxvol.main --config=configs/full3d_mri_t1_t2.py --workdir=runs/full3d_t1t2 \
      --config.data.store=data/mri_t1_t2/store
  python -m jaxvol.main --config=configs/full3d_mri_t1_t2.py --workdir=runs/full3d_t1t2 \
      --config.data.store=data/mri_t1_t2/store --mode=evaluate
Variant `smoke` runs in seconds on CPU. Same U-Net as every other method on this task.
"""

from jaxvol import config as base


def get_config(variant: str | None = None):
  return base.mri_t1_t2_config("full3d", variant)
