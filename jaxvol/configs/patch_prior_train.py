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

from jaxvol import config as base


def get_config(variant: str | None = None):
  c = base.set_method(base.base_config(), "full3d")
  c.data.inputs = ()
  c.data.target = "t1"
  c.data.train_region = {"0": (0.0, 0.5)}
  c.data.eval_region = {"0": (0.5, 1.0)}
  # v prediction: x0 = sqrt(abar) x_t - sqrt(1 - abar) v is near-identity at low noise, which
  # a short-trained network otherwise fails to learn (its x0 estimate at t=50 was worse than x_t).
  c.diffusion.parameterization = "v"
  c.data.crop_size = (32, 32, 32)
  c.data.batch_size = 4
  c.model.base_width = 32
  c.model.channel_mults = (1, 2, 4)
  c.model.num_res_blocks = 2
  c.inference.window = (32, 32, 32)
  tokens = [t for t in (variant or "").split(",") if t]
  if any(t not in ("smoke", "cpu", "positions") for t in tokens) or {"smoke", "cpu"} <= set(tokens):
    raise ValueError(f"unknown variant {variant!r}: smoke or cpu, optionally with positions")
  if "smoke" in tokens:
    base.smoke_overrides(c)
  if "cpu" in tokens:
    base.cpu_overrides(c)
    c.train.steps, c.train.time_limit_minutes = 4000, 15.0
  c.data.position_channels = "positions" in tokens
  # Axis 0 is the train/eval split: its channel would only ever be trained on the other half.
  c.data.position_axes = (1, 2)
  c.inference.window = tuple(c.data.crop_size)
  return c
