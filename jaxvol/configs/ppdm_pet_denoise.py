"""PPDM for low-count PET denoising: low-count PET -> full-count PET (puzzle factor 2).

Data: a store with modalities `pet_low` and `pet_full` sharing one intensity scale, e.g.
  python tools/convert.py --datalist list.csv --out STORE --preset pet_low=pet \
      --preset pet_full=pet:ref=pet_low
Launch:
  python -m jaxvol.main --config=configs/ppdm_pet_denoise.py --workdir=runs/ppdm_pet \
      --config.data.store=STORE
  python -m jaxvol.main --config=configs/ppdm_pet_denoise.py --workdir=runs/ppdm_pet \
      --config.data.store=STORE --mode=evaluate
Split: the stores this repository builds (tools/prepare_data.py --task pet_denoise, the demo's
phantom) give every subject the same anatomy, only the noise differs, so training crops come from
RAS z in [0, 0.6) and evaluation from [0.6, 1] of the test subjects: the evaluated anatomy is never
trained on (`base.PET_TRAIN_REGION`). With a store whose test subjects are other people, add the
variant token `whole` (train and evaluate whole volumes).
Variants (comma-separated tokens): `smoke` (seconds on CPU), `demo` (the README quick start: about
10 minutes on 2 CPU cores on the nilearn MNI152-based PET phantom), `whole`.
"""

from jaxvol import config as base


def get_config(variant: str | None = None):
  tokens = [t for t in (variant or "").split(",") if t]
  if any(t not in ("smoke", "demo", "whole") for t in tokens) or {"smoke", "demo"} <= set(tokens):
    raise ValueError(f"unknown variant {variant!r}: use smoke or demo, optionally with whole")
  c = base.base_config()
  c.method = "ppdm"
  c.data.inputs = ("pet_low",)
  c.data.target = "pet_full"
  c.data.crop_size = (64, 64, 64)
  c.data.batch_size = 2
  c.model.base_width = 32
  c.model.channel_mults = (1, 2, 4)
  c.model.num_res_blocks = 2
  c.ppdm.factor = (2, 2, 2)
  c.ppdm.sample_steps = 10
  c.eval.input_baseline = True
  c.data.train_region, c.data.eval_region = base.pet_regions()
  base.clamp_for_preset(c, "pet")  # for the baselines that clamp x0 (PPDM does not)
  if "whole" in tokens:
    c.data.train_region = c.data.eval_region = None
  if "smoke" in tokens:
    base.smoke_overrides(c)
  elif "demo" in tokens:
    c.data.crop_size = (32, 32, 32)
    c.data.batch_size = 2
    c.model.base_width = 16
    c.model.channel_mults = (1, 2, 4)
    c.model.num_res_blocks = 1
    c.model.groups = 8
    c.model.time_embed_dim = 64
    c.train.learning_rate = 5e-4
    c.train.warmup_steps = 20
    c.train.steps = 3000
    c.train.log_every = 50
    c.train.checkpoint_every = 250
    c.train.time_limit_minutes = 10.0
    c.ppdm.sample_steps = 5
  return c
