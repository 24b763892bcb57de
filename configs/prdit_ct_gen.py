"""PRDiT: unconditional generation of 3D CT volumes in HU, trained in two stages.

"Pixel-Level Residual Diffusion Transformer: Scalable 3D CT Volume Generation" (ICLR 2026);
jaxvol.methods.prdit. Stage 1 trains the per-token local denoiser; stage 2 freezes it (its raw
weights, read from the stage-1 run, as the authors do) and trains the global residual DiT on top.
Sampling: Euler with 1000 steps (the authors' default); the `fast` variant token switches to their
predictor-corrector with 100 steps.

Data: the abdominal CT of ../shared/data as a one-volume store (HU window -1000..1000):
  python tools/prepare_data.py --task ct_gen --out data/ct_gen
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
  cpu     64^3 crops and a tiny network that trains in minutes on 2 CPU cores.
  smoke   16^3 crops (8 tokens) and a tiny network: train and sample in seconds.
"""

# The code lives in jaxvol.configs, where an installed jaxvol finds it by name
# (`jaxvol train --config=prdit_ct_gen`); this file keeps the path form working.
from jaxvol.configs.prdit_ct_gen import get_config  # noqa: F401
