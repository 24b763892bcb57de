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

from jaxvol import config as base


def get_config(variant: str | None = None):
  tokens = base.variant_tokens(variant, ("smoke", "cpu", "positions") + base.SPLIT_TOKENS,
                               [("smoke", "cpu")])
  heldout = base.HELDOUT in tokens
  c = base.set_method(base.base_config(), "full3d")
  c.data.inputs = ()
  c.data.target = "t1"
  base.apply_split(c, "mri_t1_t2", heldout)
  # v prediction: x0 = sqrt(abar) x_t - sqrt(1 - abar) v is near-identity at low noise, which
  # a short-trained network otherwise fails to learn (its x0 estimate at t=50 was worse than x_t).
  c.diffusion.parameterization = "v"
  c.data.crop_size = (32, 32, 32)
  c.data.batch_size = 4
  c.model.base_width = 32
  c.model.channel_mults = (1, 2, 4)
  c.model.num_res_blocks = 2
  if "smoke" in tokens:
    base.smoke_overrides(c)
  if "cpu" in tokens:
    base.cpu_overrides(c)
    c.train.steps, c.train.time_limit_minutes = 4000, 15.0
  c.data.position_channels = "positions" in tokens
  c.data.position_axes = base.prior_position_axes(heldout)
  c.inference.window = tuple(c.data.crop_size)
  return c
