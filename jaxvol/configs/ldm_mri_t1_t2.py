"""Latent diffusion for MRI T1 -> T2 translation (jaxvol.methods.ldm): the config mri_t1_t2 with
the token `ldm` (jaxvol/configs/mri_t1_t2.py: data, the two-stage launch, variants), e.g.
`--config=ldm_mri_t1_t2:cpu,heldout` = `--config=mri_t1_t2:ldm,cpu,heldout`. It needs the
autoencoder run of configs/ldm_autoencoder.py with the same size token:
  python -m jaxvol.main --config=configs/ldm_mri_t1_t2.py:heldout \
      --workdir=runs/ldm_t1t2 --config.data.store=data/mri_t1_t2/store \
      --config.ldm.autoencoder_workdir=runs/ae_t2
"""

from jaxvol import config as base
from jaxvol.configs import mri_t1_t2


def get_config(variant: str | None = None):
  return mri_t1_t2.get_config(base.with_tokens("ldm", *(variant or "").split(",")))
