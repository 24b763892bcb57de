"""jaxvol's single entry point: parses flags and dispatches; the work lives in train/ and eval/.

  python -m jaxvol.main --config=configs/ppdm_pet_denoise.py:smoke --workdir=runs/pet \
      --mode=train|evaluate|sample|plan|import [--config.train.steps=200 ...]
(the installed command `jaxvol train|evaluate|sample|plan ...` runs the same, jaxvol.cli; --config
takes a config file or the NAME of a packaged config, `--config=ppdm_pet_denoise:smoke`:
jaxvol.configs)
(evaluate on a configs/pnp_*.py config runs plug-and-play reconstruction with its prior; sample
on an unconditional config, such as configs/prdit_ct_gen.py, generates config.sample.num volumes
from noise: jaxvol.eval.generate; plan compiles the train step and the sampler for a mesh from
abstract shapes and prints per-device memory and FLOPs, needing no data: jaxvol.train.plan;
import writes an authors' released checkpoint into the workdir as a run: jaxvol.train.importer)
"""

import logging
import os
import re
import sys
import traceback

import jax
from absl import app
from absl import flags
from ml_collections import config_flags

from jaxvol import configs
from jaxvol.errors import UserError
from jaxvol.train import distributed

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file[:variant].", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")
flags.DEFINE_enum("mode", "train", ["train", "evaluate", "sample", "plan", "import"],
                  "What to run.")
flags.DEFINE_bool("distributed", False, "Start JAX's multi-host runtime first, from "
                  "config.distributed or the cluster's environment (SLURM, Open MPI, Cloud TPU, "
                  "JAX_COORDINATOR_ADDRESS): jaxvol.train.distributed, docs/launch.md.")
flags.DEFINE_string("checkpoint", None, "evaluate / sample: which checkpoint: auto (the best "
                    "validation checkpoint when training validated, else the latest), best, "
                    "latest or a step number (default: config.eval.checkpoint).")
flags.DEFINE_bool("force", False, "train: take over the workdir lock (WORKDIR/train.lock) held by "
                  "another host's run, or a live one: only when that run is known to be gone.")
flags.DEFINE_bool("verbose", False, "On an error, print the full traceback before its line.")
flags.DEFINE_string("plan_mesh", "", "--mode=plan: mesh sizes, e.g. data:1,spatial:4,model:1 "
                    "(default: config.mesh).")
flags.DEFINE_float("plan_device_memory_gb", None, "--mode=plan: per-device memory in GB to check "
                   "the compiled steps against.")
flags.DEFINE_integer("plan_devices", 0, "--mode=plan: plan on this many fake CPU devices (for "
                     "meshes larger than this machine; same as XLA_FLAGS="
                     "--xla_force_host_platform_device_count=N).")
flags.DEFINE_string("plan_shape", "", "--mode=plan: sampled volume D,H,W (default: the crop).")
flags.DEFINE_enum("import_from", None, ["sparse", "prdit", "prdit-fm"], "--mode=import: whose "
                  "checkpoint (`jaxvol import --from ...`): jaxvol.train.importer.")
flags.DEFINE_string("import_checkpoint", None, "--mode=import: the authors' checkpoint file "
                    "(.pt/.pth with PyTorch installed, or an .npz of their state dict).")
flags.DEFINE_enum("import_weights", "ema", ["ema", "model"], "--mode=import (PRDiT): their "
                  "checkpoint's ema (what their sample.py loads) or model (raw) weights.")
flags.mark_flags_as_required(["config", "workdir"])


def split_list_fields(config):
  """`--config.data.inputs=T1,T2` arrives as the one-element tuple ('T1,T2',): split it into the
  modalities it names (no modality name holds a comma: jaxvol.data.store.read_datalist)."""
  inputs = tuple(x.strip() for item in config.data.inputs for x in str(item).split(",")
                 if x.strip())
  if inputs != tuple(config.data.inputs):
    config.data.inputs = inputs
  return config


def _one_line(e: BaseException) -> str:
  """An exception's message on one line, without the quoting KeyError and ml_collections add."""
  msg = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
  msg = msg.replace("\\'", "'").replace("\\n", " ").strip("'\"")
  typo = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', msg)
  if typo:  # ml_collections' message for an override of a field that does not exist
    return f"no config field {typo.group(2)!r}; did you mean {typo.group(1)!r}?"
  return " ".join(msg.split())


def main(argv):
  """absl's entry: `_main`, with the mistakes a user makes (a missing store or file, a wrong
  modality or subject, a bad volume, a damaged checkpoint, a busy workdir: jaxvol.errors)
  reported as one line and exit status 1, not a traceback (which --verbose prints)."""
  from jaxvol.data.nifti import VolumeError  # pylint: disable=g-import-not-at-top
  try:
    _main(argv)
  except (UserError, VolumeError, FileNotFoundError, FileExistsError, KeyError) as e:
    if FLAGS.verbose:
      traceback.print_exc()
    print(f"error: {_one_line(e)}", file=sys.stderr)
    sys.exit(1)


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout,
                      force=True)
  for noisy in ("absl", "orbax", "jax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  if not FLAGS.verbose:
    # Orbax logs the traceback of a failed background save (absl's logger) before jaxvol raises
    # it as one line (jaxvol.errors.CheckpointError); --verbose shows it.
    for noisy in ("absl", "orbax"):
      logging.getLogger(noisy).setLevel(logging.CRITICAL)
  config = split_list_fields(FLAGS.config)
  if FLAGS.checkpoint is not None:
    from jaxvol.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
    with config.unlocked():
      config.eval.checkpoint = str(ckpt_lib.parse_selection(FLAGS.checkpoint))
      config.eval.checkpoint_step = -1
  if FLAGS.mode == "plan":
    _plan(config)  # one process, abstract shapes: no data, no other hosts
    return
  if FLAGS.distributed or distributed.requested(config):
    distributed.initialize(config)  # before anything starts a JAX backend
  if not config.data.store:
    raise app.UsageError("config.data.store is empty: convert your data with `jaxvol convert` "
                         "(tools/convert.py) and pass --config.data.store=DIR")
  # Imported here so --help stays fast and absl flags are parsed before Grain workers start.
  from jaxvol.eval import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  from jaxvol.train import loop  # pylint: disable=g-import-not-at-top
  # Evaluation and sampling split one volume over config.mesh.spatial x model devices when > 1
  # (jaxvol.eval.samplers.choose).
  if FLAGS.mode == "import":
    if not FLAGS.import_from or not FLAGS.import_checkpoint:
      raise app.UsageError("import needs --from sparse|prdit|prdit-fm and the checkpoint file: "
                           "jaxvol import --from prdit CHECKPOINT --config=... --workdir=RUN")
    from jaxvol.train import importer  # pylint: disable=g-import-not-at-top
    record = importer.import_checkpoint(config, FLAGS.workdir, FLAGS.import_from,
                                        FLAGS.import_checkpoint, FLAGS.import_weights)
    logging.info("imported %s parameters from %s: sample, evaluate and predict use %s now",
                 f"{record['parameters']:,}", record["file"], FLAGS.workdir)
  elif FLAGS.mode == "train":
    validate = None
    if int(config.train.get("validate_every", 0)) > 0 and config.data.inputs:
      validate = evaluate_lib.validator(config, FLAGS.workdir)
    elif int(config.train.get("validate_every", 0)) > 0 and \
        config.diffusion.get("objective", "diffusion") == "flow":
      # An unconditional flow model: PRDiT-FM's reconstruction at t = config.flow.val_t.
      validate = evaluate_lib.reconstruction_validator(config, FLAGS.workdir)
    result = loop.train(config, FLAGS.workdir, validate=validate, force=FLAGS.force)
    if result.get("signal") is not None:
      # A scheduler must tell "preempted, resume me" from "done": 128 + the signal, as a shell
      # reports a process killed by it.
      logging.info("stopped by signal %d at step %d: checkpoint saved; run the same command to "
                   "resume", result["signal"], result["step"])
      sys.exit(128 + int(result["signal"]))
    if result.get("stopped"):
      logging.info("stopped at step %d (%s): checkpoint saved; run the same command to resume",
                   result["step"], result["stopped"])
    else:
      logging.info("training finished at step %d", result["step"])
  elif FLAGS.mode == "evaluate" and "pnp" in config:
    from jaxvol.eval import pnp as pnp_lib  # pylint: disable=g-import-not-at-top
    summary = pnp_lib.reconstruct(config, FLAGS.workdir)
    for name, entry in summary["metrics"].items():
      logging.info("%-12s %s", name, "  ".join(f"{k}={v:.4f}" for k, v in entry.items()))
  elif FLAGS.mode == "evaluate":
    summary = evaluate_lib.evaluate(config, FLAGS.workdir)
    logging.info("evaluated the %s", summary.get("checkpoint"))
    for name, entry in summary["metrics"].items():
      logging.info("%-5s %s", name, "  ".join(f"{k}={v:.4f}" for k, v in entry.items()))
  elif not config.data.inputs:
    from jaxvol.eval import generate as generate_lib  # pylint: disable=g-import-not-at-top
    result = generate_lib.generate(config, FLAGS.workdir)
    logging.info("wrote %d samples to %s", len(result["files"]),
                 os.path.dirname(result["files"][0]))
  else:
    evaluate_lib.sample(config, FLAGS.workdir)


def _plan(config):
  from jaxvol.train import plan as plan_lib  # pylint: disable=g-import-not-at-top
  # Before any JAX backend starts: afterwards the device count is fixed.
  plan_lib.request_devices(FLAGS.plan_devices)
  report = plan_lib.plan(config, FLAGS.workdir,
                         plan_lib.parse_mesh(FLAGS.plan_mesh) if FLAGS.plan_mesh else None,
                         FLAGS.plan_device_memory_gb, plan_lib.parse_shape(FLAGS.plan_shape))
  if jax.process_index() == 0:
    print(plan_lib.format_report(report), flush=True)


def run(argv: list[str]) -> None:
  """Runs `main` under absl on a full command line (argv[0] is the program name), after mapping
  a config NAME to its packaged file; an unknown name prints one line and exits with status 2."""
  program = os.path.basename(argv[0])
  try:
    argv = configs.resolve_argv(argv)
  except configs.UnknownConfigError as e:
    print(f"{program}: error: {e}", file=sys.stderr)
    sys.exit(2)
  if any(a in ("--help", "-h", "--helpfull", "--helpshort") for a in argv[1:]):
    app.run(main, argv=argv)
    return
  try:  # parse here (once), so a misspelled flag or override is one line, not a traceback
    remaining = FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    print(f"{program}: error: {_one_line(e)}", file=sys.stderr)
    sys.exit(2)
  app.run(main, argv=argv, flags_parser=lambda _: remaining)


if __name__ == "__main__":
  run(sys.argv)
