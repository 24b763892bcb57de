"""Sparse voxel-space diffusion with STM for low-dose CT denoising (HU in, HU out).

Data: a store with modalities `ct_low` and `ct` (HU window presets). With your own subjects,
whole volumes of the `train` split train and whole volumes of the `test` split are scored, in
Gaussian-blended windows of the training patch, metrics in HU:
  python -m jaxvol.main --config=configs/sparse_ct_denoise.py --workdir=runs/sparse_ct_denoise \
      --config.data.store=STORE
The repository's data is one abdominal CT with simulated low-dose noise (see
jaxvol.data.degrade.simulate_low_dose_ct):
  python tools/prepare_data.py --task ct_denoise --out data/ct_denoise
Its test subject is the same CT with new noise, so it needs the token `heldout`: training uses the
lower 60% of the volume's z axis (3 noise realisations), evaluation the upper 40% of the
new-noise realisation:
  python -m jaxvol.main --config=configs/sparse_ct_denoise.py:heldout \
      --workdir=runs/sparse_ct_denoise --config.data.store=data/ct_denoise/store
  python -m jaxvol.main --config=configs/sparse_ct_denoise.py:heldout \
      --workdir=runs/sparse_ct_denoise --config.data.store=data/ct_denoise/store --mode=evaluate
Variants: `smoke` (seconds on CPU), `cpu` (an 8-wide U-Net, 16^3 patches, 10 minutes on 2 CPU
cores); no variant is the paper's network (width 64, 5 levels, attention at 1/8) for accelerators.
Every variant uses the authors' U-Net layout (`--config.model.layout=jaxvol` for jaxvol's; the
authors' measured better); `authors` also switches to their sampler (11 evaluations) and training
recipe (no clipping or warm-up, float32, a 50%-overlap patch grid without flips, raw weights at
evaluation) and combines with the others, e.g.
--config=configs/sparse_ct_denoise.py:authors,cpu,heldout
(`whole`, the default, may be named.)
Residual learning, `--config.model.residual=True` (jaxvol's option, not the paper's: the x0
estimate is the low-dose input plus the network's output), turns the `cpu` recipe from 4.6 dB
below BM4D to level with it at the same 2400 steps (docs/results.md, "Learned vs classical").
"""

from jaxvol import config as base


def get_config(variant: str | None = None):
  return base.sparse_config("ct_denoise", variant)
