"""Shared pieces of the sparse-diffusion experiments (sparse_speedup.py, sparse_ablation.py).

A run trains one config with the library's own jitted train step, Grain pipeline and optimizer
(not the checkpointing loop: these runs are short and re-run from scratch), and every
`eval_every` steps samples a fixed set of held-out validation crops with the EMA weights and the
method's own sampler. Validation PSNR/SSIM are computed in network units over whole crops with
data range 2 (the [-1, 1] intensity window: for the CT task that is PSNR over a 2000 HU window).
Training time excludes validation and compilation (the step is compiled before the clock starts).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxvol import experiment
from jaxvol import fileio
from jaxvol.data import pipeline
from jaxvol.data import store as store_lib
from jaxvol.eval import metrics as metrics_lib
from jaxvol.parallel import mesh as mesh_lib
from jaxvol.train import loop
from jaxvol.train import state as state_lib

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


@dataclasses.dataclass
class Run:
  """One config trained step by step with periodic validation."""

  config: Any
  workdir: str

  def __post_init__(self):
    c = self.config
    self.parts = loop.build_everything(c, self.workdir)
    self.method = self.parts.method
    self.compiled, self.cost = loop.compile_step(self.parts, c)
    self.state = state_lib.create_state(self.method, self.parts.optimizer,
                                        jax.random.PRNGKey(c.seed), self.parts.example,
                                        self.parts.state_sharding)
    self.data = pipeline.make_train_iterator(
        c.data.store, c.data.train_split, loop.modality_keys(c), tuple(c.data.crop_size),
        c.data.batch_size, seed=c.seed, num_workers=c.data.num_workers, flips=c.data.flips,
        region=c.data.train_region)
    mesh = self.parts.mesh
    self.bsh = mesh_lib.batch_sharding(mesh)
    self.rng = jax.device_put(jax.random.PRNGKey(c.seed + 1), mesh_lib.replicated(mesh))
    self.shapes = {k: v.shape for k, v in self.parts.example.items()}
    self.sample = jax.jit(self.method.sample)
    self.step = 0
    self.train_seconds = 0.0

  def train(self, n: int) -> float:
    """n more steps; returns the last loss."""
    t0 = time.time()
    for _ in range(n):
      raw = loop.assemble_batch(next(self.data), len(self.config.data.inputs))
      batch = {k: jax.make_array_from_process_local_data(self.bsh, raw[k], self.shapes[k])
               for k in ("cond", "target")}
      self.state, metrics = self.compiled(self.state, batch, self.rng)
    loss = float(metrics["loss"])  # also waits for the device
    self.train_seconds += time.time() - t0
    self.step += n
    return loss

  def predict(self, cond: np.ndarray, seed: int = 0, batch: int = 4) -> np.ndarray:
    params = self.state["ema_params"]
    outs = []
    for i in range(0, len(cond), batch):
      outs.append(np.asarray(self.sample(params, jnp.asarray(cond[i:i + batch]),
                                         jax.random.PRNGKey(seed + i))))
    return np.concatenate(outs)

  def validate(self, val: dict[str, np.ndarray]) -> dict[str, float]:
    return crop_metrics(self.predict(val["cond"]), val["target"])

  def curve(self, steps: int, eval_every: int, val: dict, log=print) -> list[dict]:
    points = []
    while self.step < steps:
      loss = self.train(min(eval_every, steps - self.step))
      m = self.validate(val)
      points.append({"step": self.step, "train_seconds": self.train_seconds, "loss": loss, **m})
      log(f"  step {self.step:5d}  {self.train_seconds:7.1f}s  loss {loss:.4f}  "
          f"psnr {m['psnr']:.2f}  ssim {m['ssim']:.3f}")
    return points


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
