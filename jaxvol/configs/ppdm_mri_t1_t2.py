"""PPDM (puzzle factor 2) for MRI T1 -> T2 translation: the config mri_t1_t2 with the token `ppdm`
(jaxvol/configs/mri_t1_t2.py: data, launch commands, variants), e.g.
`--config=ppdm_mri_t1_t2:cpu,heldout` = `--config=mri_t1_t2:ppdm,cpu,heldout`:
  python -m jaxvol.main --config=configs/ppdm_mri_t1_t2.py:heldout \
      --workdir=runs/ppdm_t1t2 --config.data.store=data/mri_t1_t2/store
"""

from jaxvol import config as base
from jaxvol.configs import mri_t1_t2


def get_config(variant: str | None = None):
  return mri_t1_t2.get_config(base.with_tokens("ppdm", *(variant or "").split(",")))
