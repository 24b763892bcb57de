"""Plug-and-play 3D MRI reconstruction from simulated undersampled Cartesian k-space (R=4 or 8,
single- or multi-coil) with the patch diffusion prior of configs/patch_prior_train.py.

Variant tokens: r4 (default) | r8, multicoil (8 synthetic coils), smoke; e.g. :r8,multicoil

Measurements are simulated from the stroke T1 (the hemisphere the prior did not train on); the
evaluation writes zero-filled, TV and diffusion reconstructions as NIfTI with metrics and previews.
Launch (after training the prior into runs/patch_prior):
  python -m jaxvol.main --config=configs/pnp_mri_recon.py --workdir=runs/pnp_mri_recon \
      --config.data.store=data/mri_t1_t2/store --config.pnp.prior_workdir=runs/patch_prior \
      --mode=evaluate
`--config.pnp.solver=dps`, `--config.pnp.prior=whole` switch the solver and the prior's mode.
"""

# The code lives in jaxvol.configs, where an installed jaxvol finds it by name
# (`jaxvol train --config=pnp_mri_recon`); this file keeps the path form working.
from jaxvol.configs.pnp_mri_recon import get_config  # noqa: F401
