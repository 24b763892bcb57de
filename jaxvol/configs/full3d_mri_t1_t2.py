"""Full-resolution 3D DDPM (full3d) for MRI T1 -> T2 translation: the config mri_t1_t2 with the token `full3d`
(jaxvol/configs/mri_t1_t2.py: data, launch commands, variants), e.g.
`--config=full3d_mri_t1_t2:cpu,heldout` = `--config=mri_t1_t2:full3d,cpu,heldout`:
  python -m jaxvol.main --config=configs/full3d_mri_t1_t2.py:heldout \
      --workdir=runs/full3d_t1t2 --config.data.store=data/mri_t1_t2/store
"""

from jaxvol import config as base
from jaxvol.configs import mri_t1_t2


def get_config(variant: str | None = None):
  return mri_t1_t2.get_config(base.with_tokens("full3d", *(variant or "").split(",")))
