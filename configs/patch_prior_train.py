"""An unconditional 3D diffusion prior trained on random patches of MRI volumes (the stroke T1).

For the plug-and-play solvers of jaxvol.inverse (DiffPIR, DPS): the prior is the full-resolution
DDPM of `full3d` with no condition channels (config.data.inputs = ()), trained on random crops
and later evaluated on whole volumes as a patch prior (Gaussian-blended, randomly shifted windows
of the crop size, jaxvol.inverse.priors.from_method) or in one whole-volume pass.

Data: any store with modality `t1`; the repository's is the stroke T1 (one subject):
  python tools/prepare_data.py --task mri_t1_t2 --out data/mri_t1_t2
Launch on that store (one subject: train on one hemisphere, token `heldout`):
  python -m jaxvol.main --config=configs/patch_prior_train.py:heldout --workdir=runs/patch_prior \
      --config.data.store=data/mri_t1_t2/store
Variant tokens (comma-separated): `smoke` runs in seconds on CPU; `cpu` is the 2-core CPU budget
of experiments/patch_prior.py (width 8, 16^3 patches, 15 minutes); `positions` adds the
normalised position channels; `heldout` trains on one hemisphere (RAS x in [0, 0.5)) and leaves
the other to the reconstruction configs (configs/pnp_*.py with `heldout`); without it (or with
`whole`, the same) the prior trains on whole volumes of the `train` split and the
reconstructions use the `test` split. The position channels encode RAS x, y and z on whole
volumes, only y and z under `heldout` (`data.position_axes = (1, 2)`), whose whole range the
training crops cover: an x channel would hold, at evaluation, coordinates the network never saw
in training (jaxvol.data.pipeline.check_position_coverage refuses such a config). A
reconstruction must use the prior's tokens (`heldout`, `positions`).
"""

# The code lives in jaxvol.configs, where an installed jaxvol finds it by name
# (`jaxvol train --config=patch_prior_train`); this file keeps the path form working.
from jaxvol.configs.patch_prior_train import get_config  # noqa: F401
