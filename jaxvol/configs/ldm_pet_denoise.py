"""Latent diffusion for low-count PET denoising (jaxvol.methods.ldm): pet_low -> pet_full on the
latents of a frozen KL autoencoder trained first on pet_full with configs/ldm_autoencoder.py and
the same size token.

  python tools/prepare_data.py --task pet_denoise --out data/pet_denoise
  python -m jaxvol.main --config=configs/ldm_autoencoder.py:pet_denoise,cpu,heldout \
      --workdir=runs/ae_pet --config.data.store=data/pet_denoise/store
  python -m jaxvol.main --config=configs/ldm_pet_denoise.py:cpu,heldout --workdir=runs/ldm_pet \
      --config.data.store=data/pet_denoise/store --config.ldm.autoencoder_workdir=runs/ae_pet
  python -m jaxvol.main --config=configs/ldm_pet_denoise.py:cpu,heldout --workdir=runs/ldm_pet \
      --config.data.store=data/pet_denoise/store --mode=evaluate

Variant tokens: `smoke`, `cpu` (the quick start's budget: 32^3 crops, a 16-wide U-Net on the 8^3
latent), `heldout` (the PET tasks' z split, jaxvol.data.tasks), `whole` (the default, named).
Without a size token: 64^3 crops, the 32-wide U-Net of the other PET configs, MAISI's first-stage
autoencoder. Sampling: DDIM-50 on the whole latent, decoded whole (set
config.autoencoder.decode_window for windows).
"""

from jaxvol import config as base


def get_config(variant: str | None = None):
  tokens = base.variant_tokens(variant, ("smoke", "cpu") + base.SPLIT_TOKENS, [("smoke", "cpu")])
  c = base.set_method(base.base_config(), "ldm")
  c.data.inputs, c.data.target = ("pet_low",), "pet_full"
  c.data.crop_size, c.data.batch_size = (64, 64, 64), 2
  c.model.base_width, c.model.channel_mults, c.model.num_res_blocks = 32, (1, 2, 4), 2
  c.eval.input_baseline = True
  base.apply_split(c, "pet_denoise", base.HELDOUT in tokens)
  if "smoke" in tokens:
    base.smoke_overrides(c)
  elif "cpu" in tokens:
    base.cpu_task_overrides(c)
  base.autoencoder_size(c, "smoke" if "smoke" in tokens else "cpu" if "cpu" in tokens else "paper")
  c.inference.window = ()  # the latent is sampled whole
  return c
