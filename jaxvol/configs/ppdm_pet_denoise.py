"""PPDM for low-count PET denoising: low-count PET -> full-count PET (puzzle factor 2).

Data: a store with modalities `pet_low` and `pet_full` sharing one intensity scale, e.g.
  python tools/convert.py --datalist list.csv --out STORE --preset pet_low=pet \
      --preset pet_full=pet:ref=pet_low
Launch (your own subjects: whole volumes of the `train` split train, whole volumes of the `test`
split are scored):
  python -m jaxvol.main --config=configs/ppdm_pet_denoise.py --workdir=runs/ppdm_pet \
      --config.data.store=STORE
  python -m jaxvol.main --config=configs/ppdm_pet_denoise.py --workdir=runs/ppdm_pet \
      --config.data.store=STORE --mode=evaluate
Split `heldout`: the stores this repository builds (tools/prepare_data.py --task pet_denoise, the
demo's phantom) give every subject the same anatomy, only the noise differs, so with them add the
token `heldout`: training crops come from RAS z in [0, 0.6) and evaluation from [0.6, 1] of the
test subjects, so the evaluated anatomy is never trained on (jaxvol.data.tasks):
  python tools/prepare_data.py --task pet_denoise --out data/pet_denoise
  python -m jaxvol.main --config=configs/ppdm_pet_denoise.py:heldout --workdir=runs/ppdm_pet \
      --config.data.store=data/pet_denoise/store
Variants (comma-separated tokens): `smoke` (seconds on CPU); `cpu` (32^3 crops, a 16-wide U-Net,
about 10 minutes of training on 2 CPU cores: `base.demo_overrides`); `demo` (the README quick
start on the nilearn MNI152-based PET phantom: `cpu` with `heldout`, its validation, loss, 4200
steps within 12 minutes and inference settings below); `heldout`; `whole` (the
default, named; older commands used it, and `demo,whole` drops the demo's held-out split);
`fullvolume`: train on WHOLE volumes (under `heldout`: each subject's whole training region, RAS z
in [0, 0.6)) edge-padded to the spatial multiple instead of random crops, and sample in one pass
(`base.apply_fullvolume`; not `whole`, which names the split). Training sets crop_size to the
padded region, the largest over the training subjects (smaller ones are edge-padded up to it),
from the store (`jaxvol.train.loop.resolve_whole_crop`). E.g. :heldout,fullvolume
Residual learning, `--config.model.residual=True` (jaxvol's option, not the paper's: the puzzled
x0 estimate is puzzle(input) plus the network's output), keeps PPDM's PSNR on the PET benchmark
and narrows its spread over seeds (docs/results.md, "Learned vs classical").
"""

from jaxvol import config as base


def get_config(variant: str | None = None):
  tokens = base.variant_tokens(
      variant, ("smoke", "cpu", "demo", base.FULLVOLUME) + base.SPLIT_TOKENS,
      [("smoke", "cpu", "demo")])
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
  # The demo's phantom shares one anatomy over its subjects: `demo` holds out a region too.
  heldout = base.HELDOUT in tokens or ("demo" in tokens and base.WHOLE not in tokens)
  base.apply_split(c, "pet_denoise", heldout)
  base.clamp_for_preset(c, "pet")  # for the baselines that clamp x0 (PPDM does not)
  if "smoke" in tokens:
    base.smoke_overrides(c)
  elif "cpu" in tokens or "demo" in tokens:
    base.demo_overrides(c)
  if "demo" in tokens:
    # Validation on the phantom's `val` subject (the held-out region; anatomy never trained on,
    # noise and lesions of its own) every 300 steps; evaluate uses the best step.
    c.train.validate_every = 300
    # One bridge step from x_T = y, chosen on that validation subject after 800 steps: 27.29 dB
    # against 26.81 with 5 steps (with s = 1).
    c.ppdm.sample_steps = 1
    # Bridge variance s = 0.1 instead of BBDM's 1, chosen on the same validation subject at 600
    # steps (experiments/learned_vs_classical.py --set ppdm.max_var=S, seed 0): 27.81 dB / SSIM
    # 0.841 against 27.29 / 0.813 with s = 1 (s = 0: 27.78; s = 0.1 with lr 1e-3: 27.60).
    c.ppdm.max_var = 0.1
    # Inference in blended 32^3 windows (the training crop) with the 8-flip self-ensemble, chosen
    # on the same validation subject with the best step of a 3000-step run: 28.81 dB against
    # 28.50 for one whole-volume pass (windows alone 28.68, flips alone 28.77; docs/usage.md).
    c.inference.window = (32, 32, 32)
    c.inference.flip_axes = (0, 1, 2)
    # An L2 loss on the puzzled x0 instead of L1, and 4200 steps instead of 3000, chosen on the
    # same validation subject with the windows and flips (experiments/learned_vs_classical.py
    # --set ppdm.loss=l2, seed 0): 28.91 dB at step 3000 against L1's 28.81, still rising to
    # 29.10 at step 4200 where L1 had levelled off at 28.8 from step 2400.
    c.ppdm.loss = "l2"
    c.train.steps, c.train.time_limit_minutes = 4200, 12.0
    # Tuning BM4D costs ~5 s per 40^3 box and grid point on 2 cores: two training subjects.
    c.eval.reference_tune_subjects = 2
    c.eval.reference_tune_box = (40, 40, 40)
  if base.FULLVOLUME in tokens:
    base.apply_fullvolume(c)
  return c
