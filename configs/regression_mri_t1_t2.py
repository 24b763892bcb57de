"""Direct regression U-Net baseline (one forward pass) for MRI T1 -> T2 translation
(stroke volumes, hemisphere region split).

Data: a store with modalities `t1` and `t2` of one co-registered subject, e.g.
  python tools/prepare_data.py --task mri_t1_t2 --out data/mri_t1_t2
Launch:
  python -m jaxvol.main --config=configs/regression_mri_t1_t2.py --workdir=runs/regression_t1t2 \
      --config.data.store=data/mri_t1_t2/store
  python -m jaxvol.main --config=configs/regression_mri_t1_t2.py --workdir=runs/regression_t1t2 \
      --config.data.store=data/mri_t1_t2/store --mode=evaluate
Variant `smoke` runs in seconds on CPU. Same U-Net as every other method on this task.
"""

# The code lives in jaxvol.configs, where an installed jaxvol finds it by name
# (`jaxvol train --config=regression_mri_t1_t2`); this file keeps the path form working.
from jaxvol.configs.regression_mri_t1_t2 import get_config  # noqa: F401
