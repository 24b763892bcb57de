"""Plug-and-play 3D MRI reconstruction from simulated undersampled Cartesian k-space (R=4 or 8,
single- or multi-coil) with the patch diffusion prior of configs/patch_prior_train.py.

Variant tokens: r4 (default) | r8, multicoil (8 synthetic coils), smoke | cpu (the prior's),
positions (a prior with position channels), heldout (the prior's one-hemisphere split); e.g.
:r8,multicoil,heldout. Use the tokens the prior was trained with.

Measurements are simulated from the T1 of the `test` split's volumes, or under `heldout` from the
stroke T1's hemisphere the prior did not train on; the evaluation writes zero-filled, TV and
diffusion reconstructions as NIfTI with metrics and previews.
Launch on the stroke store (after training the prior with `heldout` into runs/patch_prior):
  python -m jaxvol.main --config=configs/pnp_mri_recon.py:heldout --workdir=runs/pnp_mri_recon \
      --config.data.store=data/mri_t1_t2/store --config.pnp.prior_workdir=runs/patch_prior \
      --mode=evaluate
`--config.pnp.solver=dps`, `--config.pnp.prior=whole` switch the solver and the prior's mode.
"""

from jaxvol import config as base


def get_config(variant: str | None = None):
  return base.pnp_config("mri", variant)
