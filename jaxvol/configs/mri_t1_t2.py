"""MRI T1 -> T2 translation, one config for every method: PPDM (puzzle factor 2, the default),
full3d, WDM or regression, chosen by a variant token.

Data: a store with modalities `t1` and `t2` (co-registered pairs). With your own datalist (train
and test subjects, `jaxvol convert`), no split token is needed: whole volumes of the `train` split
train, whole volumes of the `test` split are scored:
  python -m jaxvol.main --config=configs/mri_t1_t2.py:ppdm \
      --workdir=runs/ppdm_t1t2 --config.data.store=STORE
The repository's store holds ONE subject (the stroke T1/T2):
  python tools/prepare_data.py --task mri_t1_t2 --out data/mri_t1_t2
so it needs the token `heldout`: training crops come from one hemisphere, the other hemisphere of
the same subject (split `train`) is scored, and the slab between validates (jaxvol.data.tasks):
  python -m jaxvol.main --config=configs/mri_t1_t2.py:ppdm,heldout \
      --workdir=runs/ppdm_t1t2 --config.data.store=data/mri_t1_t2/store
  python -m jaxvol.main --config=configs/mri_t1_t2.py:ppdm,heldout \
      --workdir=runs/ppdm_t1t2 --config.data.store=data/mri_t1_t2/store --mode=evaluate
The names ppdm_mri_t1_t2, full3d_mri_t1_t2, wdm_mri_t1_t2 and regression_mri_t1_t2 are this
config with the method's token (`--config=ppdm_mri_t1_t2:heldout` = `mri_t1_t2:ppdm,heldout`).

Variant tokens, comma-separated (e.g. `:regression,cpu,heldout`); the same U-Net for every method
without a size token:
  ppdm | full3d | wdm | regression | ldm   the method (default ppdm). ldm is latent diffusion on
           a frozen autoencoder trained first with configs/ldm_autoencoder.py and the same size
           token (--config.ldm.autoencoder_workdir=AE_RUN):
             python -m jaxvol.main --config=configs/ldm_autoencoder.py:mri_t1_t2,cpu,heldout \
                 --workdir=runs/ae_t2 --config.data.store=data/mri_t1_t2/store
             python -m jaxvol.main --config=configs/ldm_mri_t1_t2.py:cpu,heldout \
                 --workdir=runs/ldm_t1t2 --config.data.store=data/mri_t1_t2/store \
                 --config.ldm.autoencoder_workdir=runs/ae_t2
  smoke    seconds on CPU.
  cpu      about 10 minutes of training on 2 CPU cores (`base.cpu_task_overrides`): PPDM and WDM,
           whose networks run at half the crop's resolution, get the PET quick start's budget
           (32^3 crops, a 16-wide U-Net); full3d and regression 16^3 crops and an 8-wide U-Net,
           sampled in Gaussian-blended windows of the crop.
  heldout  the one-subject hemisphere split above.
  whole    the default (whole volumes, `test` split), named.
  fullvolume  (PPDM) train on WHOLE volumes (under `heldout`: the whole training hemisphere)
           edge-padded to the spatial multiple instead of random crops, and sample in one pass
           (`base.apply_fullvolume`). Training sets crop_size to the padded region from the
           store (`jaxvol.train.loop.resolve_whole_crop`): for the repository's store under
           `heldout`, (64, 160, 144) at r=2 or r=4. Not `whole`, which names the split.
"""

from jaxvol import config as base

METHODS = ("ppdm", "full3d", "wdm", "regression", "ldm")


def get_config(variant: str | None = None):
  tokens = [t.strip() for t in (variant or "").split(",") if t.strip()]
  chosen = [t for t in tokens if t in METHODS]
  if len(chosen) > 1:
    raise ValueError(f"bad variant {variant!r}: at most one of {'/'.join(METHODS)}")
  rest = ",".join(t for t in tokens if t not in METHODS)
  return base.mri_t1_t2_config(chosen[0] if chosen else "ppdm", rest)
