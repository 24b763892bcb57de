"""Direct regression U-Net baseline (one forward pass) for MRI T1 -> T2 translation.

Data: a store with modalities `t1` and `t2` (co-registered pairs). With your own datalist (train
and test subjects, `jaxvol convert`), no variant is needed: whole volumes of the `train` split
train, whole volumes of the `test` split are scored:
  python -m jaxvol.main --config=configs/regression_mri_t1_t2.py \
      --workdir=runs/regression_t1t2 --config.data.store=STORE
The repository's store holds ONE subject (the stroke T1/T2):
  python tools/prepare_data.py --task mri_t1_t2 --out data/mri_t1_t2
so it needs the token `heldout`: training crops come from RAS x in [0, 0.5) (one hemisphere) and
RAS x in [0.6, 1] of the same subject (split `train`) is scored ([0.5, 0.6) validates):
  python -m jaxvol.main --config=configs/regression_mri_t1_t2.py:heldout \
      --workdir=runs/regression_t1t2 --config.data.store=data/mri_t1_t2/store
  python -m jaxvol.main --config=configs/regression_mri_t1_t2.py:heldout \
      --workdir=runs/regression_t1t2 --config.data.store=data/mri_t1_t2/store --mode=evaluate
Variant tokens, comma-separated (e.g. `:cpu,heldout`); same U-Net as every other method on this
task without one:
  smoke    seconds on CPU.
  cpu      16^3 crops and an 8-wide U-Net: about 10 minutes of training on 2 CPU cores
           (`base.cpu_task_overrides`), sampled in Gaussian-blended windows of the crop.
  heldout  the one-subject hemisphere split above.
  whole    the default (whole volumes, `test` split), named.
"""

from jaxvol import config as base


def get_config(variant: str | None = None):
  return base.mri_t1_t2_config("regression", variant)
