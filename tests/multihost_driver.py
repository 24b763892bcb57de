"""One process of a two-"host" training run on loopback, for tests/test_multihost.py.

Each process fakes its own CPU devices, joins the job through jaxvol.train.distributed with gloo
collectives, trains the config of `run_config` with jaxvol.train.loop, then restores the
evaluation parameters the way `--mode=evaluate` does and saves them to OUT/params_<id>.npz, and
evaluates the checkpoint as `--mode=evaluate --config.mesh.spatial=<all devices>` does: each
volume's depth split over the devices of both hosts (WORKDIR/eval, written by process 0):

  python tests/multihost_driver.py --process_id=0 --num_processes=2 --port=PORT \
      --cpu_devices=2 --store=STORE --workdir=WORKDIR --out=OUT --steps=4
"""

import argparse
import json
import logging
import os
import sys

import numpy as np


def run_config(store: str, steps: int, checkpoint_every: int):
  """The smoke training config both the multi-process and the reference runs use."""
  from jaxvol import config as base  # pylint: disable=g-import-not-at-top
  c = base.base_config()
  c.method = "ppdm"
  c.data.store = str(store)
  c.data.inputs = ("pet_low",)
  c.data.target = "pet_full"
  base.smoke_overrides(c)
  c.data.batch_size = 4  # 2 rows per host: row order across hosts matters
  c.train.steps = steps
  c.train.checkpoint_every = checkpoint_every
  c.train.log_every = 1
  return c


EVAL_SHAPE = (16, 18, 16)  # the evaluated box of a 20x18x16 test volume


def eval_config(c):
  """The evaluation config: the first 16 of 20 slices, so that 4 depth shards of the puzzled
  8-slice volume exchange halos at every U-Net level."""
  ce = c.copy_and_resolve_references()
  ce.data.eval_region = {"0": (0.0, 0.8)}
  return ce


def flat(tree) -> dict:
  """A parameter pytree as {"a/b/c": array}, for .npz files."""
  import jax  # pylint: disable=g-import-not-at-top
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v) for path, v in leaves}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--process_id", type=int, required=True)
  p.add_argument("--num_processes", type=int, required=True)
  p.add_argument("--port", type=int, required=True)
  p.add_argument("--cpu_devices", type=int, default=2)
  p.add_argument("--store", required=True)
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--steps", type=int, default=4)
  p.add_argument("--checkpoint_every", type=int, default=2)
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                      format=f"[process {args.process_id}] %(message)s")
  for noisy in ("absl", "orbax", "jax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)

  c = run_config(args.store, args.steps, args.checkpoint_every)
  c.distributed.coordinator_address = f"127.0.0.1:{args.port}"
  c.distributed.num_processes = args.num_processes
  c.distributed.process_id = args.process_id
  c.distributed.cpu_collectives = "gloo"
  c.distributed.num_cpu_devices = args.cpu_devices

  # Nothing may touch a JAX backend before this: the CPU options apply at backend start.
  from jaxvol.train import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(c)
  import jax  # pylint: disable=g-import-not-at-top
  from jaxvol.eval import evaluate  # pylint: disable=g-import-not-at-top
  from jaxvol.eval import volumes  # pylint: disable=g-import-not-at-top
  from jaxvol.train import loop  # pylint: disable=g-import-not-at-top
  from jaxvol.eval import samplers  # pylint: disable=g-import-not-at-top

  result = loop.train(c, args.workdir)
  params, step = volumes.load_params(c, args.workdir)
  os.makedirs(args.out, exist_ok=True)
  np.savez(os.path.join(args.out, f"params_{args.process_id}.npz"), **flat(params))
  ce = eval_config(c)
  ce.mesh.data, ce.mesh.spatial = 1, jax.device_count()
  used, choose = [], samplers.choose
  # Records the sampler the one choice makes for the split config (a VolumeSampler over hosts).
  samplers.choose = lambda config, method: used.append(choose(config, method)) or used[-1]
  evaluate.evaluate(ce, args.workdir)
  sampler = used[0]
  summary = {"process": jax.process_index(), "processes": jax.process_count(),
             "devices": jax.device_count(), "local_devices": jax.local_device_count(),
             "train_step": result["step"], "eval_step": step,
             "sampler": type(sampler).__name__,
             "sampler_processes": sorted({d.process_index for d in sampler.mesh.devices.flat}),
             "halo_convolutions": sampler.halo_convolutions(EVAL_SHAPE)}
  print(json.dumps(summary), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
