"""An unconditional 3D diffusion prior trained on random patches of the stroke MRI volumes.

For the plug-and-play solvers of jaxvol.inverse (DiffPIR, DPS): the prior is the full-resolution
DDPM of `full3d` with no condition channels (config.data.inputs = ()), trained on random crops
and later evaluated on whole volumes as a patch prior (Gaussian-blended, randomly shifted windows
of the crop size, jaxvol.inverse.priors.from_method) or in one whole-volume pass.

Data: the stroke T1 (any store with modality `t1`), e.g.
  python tools/prepare_data.py --task mri_t1_t2 --out data/mri_t1_t2
Launch:
  python -m jaxvol.main --config=configs/patch_prior_train.py --workdir=runs/patch_prior \
      --config.data.store=data/mri_t1_t2/store
Variant `smoke` runs in seconds on CPU; `cpu` is the 2-core CPU budget of
experiments/patch_prior.py (width 8, 16^3 patches, 15 minutes); `positions` (combinable, e.g.
`cpu,positions`) adds the normalised position channels. Trained on one hemisphere (RAS x in
[0, 0.5)); the reconstruction experiments use the other. The position channels therefore encode
only RAS y and z (`data.position_axes = (1, 2)`), whose whole range the training crops cover; an
x channel would hold, at evaluation, coordinates the network never saw in training
(jaxvol.data.pipeline.check_position_coverage refuses such a config).
"""

# The code lives in jaxvol.configs, where an installed jaxvol finds it by name
# (`jaxvol train --config=patch_prior_train`); this file keeps the path form working.
from jaxvol.configs.patch_prior_train import get_config  # noqa: F401
