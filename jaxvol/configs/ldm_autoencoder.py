"""The KL autoencoder of latent diffusion (MAISI's design: 4 latent channels, 4x downsampling per
axis), trained on the target modality of a task; its evaluation is the reconstruction ceiling of
any model in its latent space (jaxvol.methods.autoencoder).

  python tools/prepare_data.py --task mri_t1_t2 --out data/mri_t1_t2
  python -m jaxvol.main --config=configs/ldm_autoencoder.py:mri_t1_t2,cpu,heldout \
      --workdir=runs/ae_t2 --config.data.store=data/mri_t1_t2/store
  python -m jaxvol.main --config=configs/ldm_autoencoder.py:mri_t1_t2,cpu,heldout \
      --workdir=runs/ae_t2 --config.data.store=data/mri_t1_t2/store --mode=evaluate

Variant tokens, comma-separated:
  mri_t1_t2 | pet_denoise   the task whose target it encodes (T2, or full-count PET; default
           mri_t1_t2). The input is the target itself: the evaluation scores reconstructions.
  smoke    seconds on CPU; cpu  minutes on 2 CPU cores (32^3 crops, width 8);
  heldout  the task's held-out split (jaxvol.data.tasks), as the other configs.
Without a size token: MAISI's first stage (64^3 crops, width 64 with multipliers (1, 2, 2),
batch 4) for accelerators. The 3D patch discriminator is off by default:
--config.autoencoder.adv_weight=0.1 --config.autoencoder.adv_start=N switches its least-squares
terms on after N steps. No perceptual loss (it needs pretrained weights). Latent diffusion on the
trained autoencoder: configs/ldm_mri_t1_t2.py, configs/ldm_pet_denoise.py.
"""

from jaxvol import config as base

TASKS = {"mri_t1_t2": "t2", "pet_denoise": "pet_full"}


def get_config(variant: str | None = None):
  tokens = base.variant_tokens(variant, (*TASKS, "smoke", "cpu", *base.SPLIT_TOKENS),
                               [("smoke", "cpu"), tuple(TASKS)])
  task = next((t for t in tokens if t in TASKS), "mri_t1_t2")
  c = base.apply_split(base.base_config(), task, base.HELDOUT in tokens)
  c.method = "autoencoder"
  c.data.target = TASKS[task]
  c.data.inputs = (c.data.target,)
  c.eval.references = ""  # the input is the target: nothing classical to compare
  c.eval.mask = "body"
  size = "smoke" if "smoke" in tokens else "cpu" if "cpu" in tokens else "paper"
  base.autoencoder_size(c, size)  # the latent-diffusion configs use the same token's
  c.data.crop_size, c.data.batch_size = (64, 64, 64), 4
  c.train.learning_rate, c.train.steps = 1e-4, 100_000
  if "cpu" in tokens:
    c.data.crop_size, c.data.batch_size = (32, 32, 32), 2
    c.train.learning_rate, c.train.steps, c.train.time_limit_minutes = 5e-4, 2000, 10.0
    c.train.log_every, c.train.checkpoint_every = 50, 200
  elif "smoke" in tokens:
    base.smoke_overrides(c)
    c.eval.references = ""
  return c
