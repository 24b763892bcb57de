"""Wavelet-domain diffusion baseline (WDM, pfriedri/wdm-3d: LLL band / 3, x0 prediction, x0
clamped to [-1, 1] in image space while sampling) for MRI T1 -> T2 translation (stroke volumes,
hemisphere region split).

Data: a store with modalities `t1` and `t2` of one co-registered subject, e.g.
  python tools/prepare_data.py --task mri_t1_t2 --out data/mri_t1_t2
Launch:
  python -m jaxvol.main --config=configs/wdm_mri_t1_t2.py --workdir=runs/wdm_t1t2 \
      --config.data.store=data/mri_t1_t2/store
  python -m jaxvol.main --config=configs/wdm_mri_t1_t2.py --workdir=runs/wdm_t1t2 \
      --config.data.store=data/mri_t1_t2/store --mode=evaluate
Variant `smoke` runs in seconds on CPU. Same U-Net as every other method on this task.
"""

# The code lives in jaxvol.configs, where an installed jaxvol finds it by name
# (`jaxvol train --config=wdm_mri_t1_t2`); this file keeps the path form working.
from jaxvol.configs.wdm_mri_t1_t2 import get_config  # noqa: F401
