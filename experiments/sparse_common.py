"""Shared pieces of the sparse-diffusion experiments (sparse_speedup.py, sparse_ablation.py).

A run trains one config through the library's training loop (jaxvol.train.loop.train: Grain
pipeline, sharded step, checkpoints; an interrupted run resumes), and every `eval_every` steps its
validation hook samples a fixed set of held-out validation crops with the EMA weights and the
method's own sampler. Validation PSNR/SSIM are the library's metrics (jaxvol.eval.metrics) in
network units over whole crops with data range 2 (the [-1, 1] intensity window: for the CT task
that is PSNR over a 2000 HU window), averaged over the crops. Training time excludes validation
and compilation (the loop's training seconds).
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxvol import experiment
from jaxvol import fileio
from jaxvol import methods
from jaxvol.data import pipeline
from jaxvol.data import store as store_lib
from jaxvol.eval import metrics as metrics_lib
from jaxvol.eval import volumes
from jaxvol.train import loop

ROOT = pathlib.Path(__file__).resolve().parents[1]

TASK_CONFIGS = {"ct_denoise": "configs/sparse_ct_denoise.py",
                "pet_denoise": "configs/sparse_pet_denoise.py",
                "mri_sr": "configs/sparse_mri_sr.py"}


def load_config(task: str, variant: str | None = None):
  return experiment.packaged_config(pathlib.Path(TASK_CONFIGS[task]).stem, variant)


def run_config(args, store: str):
  """The task's `cpu` config with the experiment's budget (crop, batch, width, lr, workers).

  Validation crops are training-size, so sampling runs in one pass (no windows).
  """
  c = load_config(args.task, "cpu,heldout")
  c.data.store = store
  c.data.crop_size = (args.crop,) * 3
  c.data.batch_size = args.batch
  c.data.num_workers = args.workers
  c.model.base_width = args.width
  c.train.learning_rate = args.lr
  c.train.warmup_steps = max(1, args.steps // 20)
  c.train.ema_decay = 0.99
  c.inference.window = ()
  if getattr(args, "layout", None):  # U-Net layout: the config's (the authors') unless given
    c.model.layout = args.layout
  return c


def validation_crops(config, n: int, seed: int = 1234) -> dict[str, np.ndarray]:
  """n fixed random training-size crops (cond, target) from the eval split's eval region."""
  store = store_lib.Store(config.data.store)
  subjects = store.subjects(config.eval.split)
  if not subjects:
    raise ValueError(f"no subjects in split {config.eval.split!r}")
  rng = np.random.default_rng(seed)
  crop = tuple(int(c) for c in config.data.crop_size)
  conds, targets = [], []
  for i in range(n):
    subj = subjects[i % len(subjects)]
    shape = tuple(subj["shape"])
    region = config.data.eval_region
    box = pipeline.region_box(shape, region) if region else tuple((0, s) for s in shape)
    lo = [int(rng.integers(a, max(a, b - c) + 1)) for (a, b), c in zip(box, crop)]
    sub = tuple((a, a + c) for a, c in zip(lo, crop))
    conds.append(np.stack([store.read(subj["id"], m, sub) for m in config.data.inputs], -1))
    targets.append(store.read(subj["id"], config.data.target, sub)[..., None])
  return {"cond": np.stack(conds).astype(np.float32), "target": np.stack(targets).astype(np.float32)}


def crop_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
  """Mean PSNR / SSIM over crops, network units, data range 2."""
  ps, ss = [], []
  for p, t in zip(pred[..., 0], target[..., 0]):
    ps.append(metrics_lib.psnr(p, t, data_range=2.0))
    ss.append(metrics_lib.ssim(p, t, data_range=2.0))
  return {"psnr": float(np.mean(ps)), "ssim": float(np.mean(ss))}


class Run:
  """One config trained by the library's loop (`jaxvol.train.loop.train`: its pipeline, step,
  checkpoints and validation hook), scored on fixed validation crops every `eval_every` steps.

  `curve` trains to `steps` (a run interrupted before resumes from its workdir), then holds the
  final EMA parameters (`params`), the method (`method`) and the compiled step's cost (`cost`).
  Each curve point joins a validation record (WORKDIR/validation.jsonl) with the training
  progress record of the same step (WORKDIR/progress.jsonl: the loss averaged since the last
  point, and training seconds, which leave out compilation and validation).
  """

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, workdir
    self.method = methods.build(config, jax.devices()[0].platform)
    self._sample = jax.jit(self.method.sample)
    self.params, self.cost = None, {}

  def predict(self, cond: np.ndarray, params=None, seed: int = 0, batch: int = 4) -> np.ndarray:
    params = self.params if params is None else params
    outs = []
    for i in range(0, len(cond), batch):
      outs.append(np.asarray(self._sample(params, jnp.asarray(cond[i:i + batch]),
                                          jax.random.PRNGKey(seed + i))))
    return np.concatenate(outs)

  def curve(self, steps: int, eval_every: int, val: dict, log=print) -> list[dict]:
    c = copy.deepcopy(self.config)
    c.train.steps = steps
    c.train.validate_every = c.train.log_every = eval_every
    c.train.checkpoint_every = steps
    c.train.patience = 0
    c.train.validate_metric = "psnr"
    c.eval.use_ema = True

    def validate(params, step):
      m = crop_metrics(self.predict(val["cond"], params), val["target"])
      log(f"  step {step:5d}  psnr {m['psnr']:.2f}  ssim {m['ssim']:.3f}")
      return m

    experiment.train(c, self.workdir, validate=validate)
    c.eval.checkpoint = "latest"
    self.params, _ = volumes.load_params(c, self.workdir)
    cost_file = pathlib.Path(self.workdir) / "train_step_cost.json"
    self.cost = json.loads(cost_file.read_text()) if cost_file.exists() else {}
    progress = {r["step"]: r for r in loop.read_progress(self.workdir)}
    return [{"step": r["step"], "train_seconds": progress[r["step"]]["seconds"],
             "loss": progress[r["step"]]["loss"], "psnr": r["psnr"], "ssim": r["ssim"]}
            for r in loop.read_validation(self.workdir)]


def timed(fn, *args, repeats: int = 1) -> float:
  """Warm seconds per call (one untimed call first to compile)."""
  jax.block_until_ready(fn(*args))
  t0 = time.time()
  for _ in range(repeats):
    jax.block_until_ready(fn(*args))
  return (time.time() - t0) / repeats


device_name = experiment.device_name


def write_json(path: pathlib.Path, obj) -> None:
  fileio.write_json_atomic(str(path), obj)


def ensure_dir(path: pathlib.Path) -> pathlib.Path:
  os.makedirs(path, exist_ok=True)
  return path
