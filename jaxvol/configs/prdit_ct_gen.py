"""PRDiT: unconditional generation of 3D CT volumes in HU, trained in two stages.

"Pixel-Level Residual Diffusion Transformer: Scalable 3D CT Volume Generation" (ICLR 2026);
jaxvol.methods.prdit. Stage 1 trains the per-token local denoiser; stage 2 freezes it (its raw
weights, read from the stage-1 run, as the authors do) and trains the global residual DiT on top.
Sampling: Euler with 1000 steps (the authors' default); the `fast` variant token switches to their
predictor-corrector with 100 steps.

Data: the abdominal CT of ../shared/data as a one-volume store (HU window -1000..1000):
  python tools/prepare_data.py --task ct_gen --out data/ct_gen
or preprocessed as the authors preprocess LIDC-IDRI (1 mm, centred 256^3, pooled to 128^3, the
per-volume `prdit` preset: clip to [-1000 HU, the 0.999 quantile], min-max to [-1, 1]), the scale
their FID and MMD numbers are on:
  python tools/prepare_data.py --task ct_gen_prdit --out data/ct_gen_prdit
ONE VOLUME: a run on it shows the mechanics (two-stage training, compiled sampling, HU output,
metrics), not a generative model of a population of CT scans. Crops larger than the 122x101x112
volume are padded with air (-1000 HU), as the pipeline does for every method.

Launch (stage 1, then stage 2 on the frozen stage 1, then sampling):
  python -m jaxvol.main --config=configs/prdit_ct_gen.py:stage1 --workdir=runs/prdit_stage1 \
      --config.data.store=data/ct_gen/store
  python -m jaxvol.main --config=configs/prdit_ct_gen.py --workdir=runs/prdit \
      --config.data.store=data/ct_gen/store --config.prdit.stage1_workdir=runs/prdit_stage1
  python -m jaxvol.main --config=configs/prdit_ct_gen.py --workdir=runs/prdit \
      --config.data.store=data/ct_gen/store --mode=sample --config.sample.metrics=True
256^3, warm-started from the 128^3 run (the local weights come with it, frozen; the DiT's at
0.1 x the learning rate; the time fine head re-initialised):
  python -m jaxvol.main --config=configs/prdit_ct_gen.py:256 --workdir=runs/prdit256 \
      --config.data.store=data/ct_gen/store --config.prdit.warm_start_workdir=runs/prdit
Sampling writes WORKDIR/samples/sample_000.nii.gz, ... in HU (see jaxvol.eval.generate for the
affine) and, with sample.metrics, generation_metrics.json (FID/MMD on MedicalNet features when
--config.eval.feature_weights=FILE is given, else clearly labelled random features).

Variants (comma-separated tokens):
  (none)  PRDiT-B/12/4 at 128^3, the paper's LIDC model (width 768, 12 heads, 4 DiT blocks;
          AdamW without weight decay, lr 8e-5 (1e-4 in stage 1) constant without warm-up, clip
          1.0, EMA 0.9999, global batch 64, 130k steps (104k in stage 1)): accelerators.
  256     the same at 256^3 (32,768 tokens; memory-efficient attention, blocks rematerialised).
  xl      PRDiT-XL/12/4 (width 1152, 16 heads).
  stage1  the local-denoiser stage (combine: `stage1`, `stage1,256`, `stage1,cpu`, ...).
  fast    sample with the predictor-corrector, 100 steps, instead of Euler with 1000.
  flow    PRDiT-FM (Fredy-Zhang/PRDiT-FM): the same network and stages with one velocity head,
          trained by straight-line flow matching (t = 0 noise, t = 1 data, t x 1000 into the
          time embedder) and sampled with Euler in 100 steps (their num_sampling_steps; set
          config.flow.solver=heun for their second-order solver, 2 evaluations per step). Their
          stage 1 and stage 2 keep PRDiT's learning rates, clip and step counts. Their stage-1
          validation (keep the checkpoint with the lowest t = 0.5 reconstruction MSE;
          jaxvol.eval.evaluate.reconstruction_validator) runs with
          --config.train.validate_every=1000 on config.eval.val_split (validation volumes: the
          shipped ct_gen stores have none). With cpu/smoke the step count is those variants'
          sample_steps. Their narrow local denoiser (64 / 16 features read out to a token's
          512 voxels) cannot carry the velocity's noise part, so their flow samples stay noisy
          (a warning says so; docs/results.md, flow at equal NFE): add
          --config.prdit.local_width=0, the paper's raw window, at several times the cost.
  cpu     64^3 crops and a tiny network that trains in minutes on 2 CPU cores.
  smoke   16^3 crops (8 tokens) and a tiny network: train and sample in seconds.
"""

from jaxvol import config as base

SIZE_TOKENS = ("256", "cpu", "smoke")


def get_config(variant: str | None = None):
  tokens = [t for t in (variant or "").split(",") if t]
  known = {"256", "xl", "stage1", "fast", "flow", "cpu", "smoke"}
  if any(t not in known for t in tokens) or sum(t in tokens for t in SIZE_TOKENS) > 1:
    raise ValueError(f"bad variant {variant!r}: tokens from {sorted(known)}, at most one of "
                     f"{', '.join(SIZE_TOKENS)}")
  c = base.base_config()
  c.method = "prdit"
  c.data.inputs = ()
  c.data.target = "ct"
  c.data.flips = False  # generation learns the anatomy's orientation; the paper does not augment
  c.data.crop_size = (128, 128, 128)
  c.data.batch_size = 64  # the paper's global batch
  c.eval.split = "train"

  p = c.prdit
  p.size, p.patch, p.stride, p.depth = ("XL" if "xl" in tokens else "B"), 12, 8, 4
  p.attention, p.chunk_size = "auto", 512
  p.sampler, p.predictor, p.sample_steps = "euler", "euler", 1000  # the authors' sample.py
  if "fast" in tokens:
    p.sampler, p.sample_steps = "pc", 100
  if "flow" in tokens:
    if "fast" in tokens:
      raise ValueError("`fast` picks the diffusion's predictor-corrector; with `flow` set "
                       "config.flow.solver / config.flow.sample_steps instead")
    c.diffusion.objective = "flow"
    c.flow.solver, c.flow.sample_steps = "euler", 100  # their configs' num_sampling_steps
    # Their stage-1 validation (reconstruction MSE at t = 0.5, every 1000 steps, the best kept)
    # needs validation volumes, which the one-volume ct_gen stores lack: switched on with
    # --config.train.validate_every=1000 and a split of validation volumes (eval.val_split).
    c.train.validate_metric = "recon_mse"
  p.stage = 1 if "stage1" in tokens else 2

  t = c.train
  t.learning_rate = 1e-4 if p.stage == 1 else 8e-5
  t.weight_decay, t.grad_clip, t.ema_decay = 0.0, 1.0, 0.9999
  t.warmup_steps = 0  # the authors: constant learning rate, no warm-up
  t.steps = 104_000 if p.stage == 1 else 130_000  # their total_steps (configs/local, global)
  t.log_every, t.checkpoint_every = 100, 2000

  if "256" in tokens:
    c.data.crop_size = (256, 256, 256)
    c.data.batch_size = 16  # (our choice) a quarter of the 128^3 batch at 8x the voxels
    p.remat = "full"
    p.warm_start_lr_scale = 0.1
  elif "cpu" in tokens:
    _tiny(c, width=64, heads=4, depth=2)
    c.data.crop_size = (64, 64, 64)
    c.data.batch_size = 2
    t.learning_rate, t.warmup_steps, t.ema_decay = 5e-4, 20, 0.999
    t.steps, t.log_every, t.checkpoint_every, t.time_limit_minutes = 2000, 20, 200, 10.0
    p.sample_steps = 20 if p.sampler == "euler" else 10
    c.eval.feature_width, c.eval.feature_depth = 16, 10
  elif "smoke" in tokens:
    _tiny(c, width=16, heads=2, depth=1)
    c.data.crop_size = (16, 16, 16)
    c.data.batch_size = 2
    t.learning_rate, t.warmup_steps = 1e-3, 1
    t.steps, t.log_every, t.checkpoint_every = 4, 2, 2
    p.sample_steps = 4
    c.sample.num = 2
    c.eval.feature_width, c.eval.feature_depth = 4, 10
  if "flow" in tokens and ("cpu" in tokens or "smoke" in tokens):
    c.flow.sample_steps = p.sample_steps
  return c


def _tiny(c, width: int, heads: int, depth: int) -> None:
  """A small residual DiT and local denoiser (widths, not the raw 1,728-wide window) for CPUs."""
  p = c.prdit
  p.size, p.width, p.heads, p.depth = "S", width, heads, depth
  p.local_width = width
  p.attention = "xla"  # a few hundred tokens: plain attention is the fastest on a CPU
