"""Damaged checkpoints cost a few steps, not the run; failed saves stop in one line; one writer
per workdir (jaxvol.train.checkpoint, jaxvol.train.lock, jaxvol.main's one-line errors).

A tiny PPDM run saves steps 2, 4 and 6; each test damages a copy of it the way a failing disk or
an interrupted copy does, then trains, evaluates, predicts or restores on it.
"""

import glob
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from jaxvol import predict as predict_lib
from jaxvol.errors import CheckpointError
from jaxvol.errors import WorkdirLockedError
from jaxvol.eval import evaluate
from jaxvol.train import checkpoint as ckpt_lib
from jaxvol.train import lock as lock_lib
from jaxvol.train import loop
from conftest import CLI_ENV
from conftest import RunningCli
from test_train import smoke_config
from test_train import tiny_store  # noqa: F401  pylint: disable=unused-import

# End to end (training runs, subprocesses or experiments): `pytest -m 'not slow'` skips it.
pytestmark = pytest.mark.slow

DAMAGE = ("overwritten_bytes", "truncated_data", "deleted_metadata", "no_commit_marker")
ENV = CLI_ENV


def _config(store, steps):
  c = smoke_config(store, steps=steps)
  c.train.checkpoint_every = c.train.log_every = 2
  c.train.keep_checkpoints = 3
  return c


@pytest.fixture(scope="module")
def run(tiny_store, tmp_path_factory):  # pylint: disable=redefined-outer-name
  """(store, workdir) of a finished 6-step run with checkpoints 2, 4, 6 (never modified)."""
  workdir = str(tmp_path_factory.mktemp("damage") / "w")
  loop.train(_config(tiny_store / "store", 6), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "6"]
  return tiny_store, workdir


def _copy(workdir, tmp_path) -> str:
  dst = str(tmp_path / "w")
  shutil.copytree(workdir, dst)
  return dst


def _data_file(step_dir) -> str:
  files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
  return max(files, key=os.path.getsize)


def damage(workdir, step, kind):
  """Damages checkpoint `step` of `workdir` in place, as `kind` (DAMAGE) says."""
  step_dir = os.path.join(workdir, "checkpoints", str(step))
  if kind == "overwritten_bytes":  # 4 KB of the array data replaced
    path = _data_file(step_dir)
    with open(path, "r+b") as f:
      f.seek(os.path.getsize(path) // 3)
      f.write(np.random.default_rng(step).bytes(4096))
  elif kind == "truncated_data":
    path = _data_file(step_dir)
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  elif kind == "deleted_metadata":
    os.remove(os.path.join(step_dir, "state", "_METADATA"))
  elif kind == "no_commit_marker":  # a save that never finished
    os.remove(os.path.join(step_dir, ckpt_lib.COMMIT_MARKER))
  else:
    raise ValueError(kind)


def _tree_listing(root) -> dict:
  out = {}
  for d, _, files in os.walk(root):
    for name in files:
      p = os.path.join(d, name)
      out[os.path.relpath(p, root)] = (os.path.getsize(p), os.path.getmtime(p))
  return out


@pytest.mark.parametrize("kind", DAMAGE)
def test_readers_fall_back_to_the_previous_step_and_touch_nothing(run, tmp_path, kind, caplog):
  _, src = run
  workdir = _copy(src, tmp_path)
  damage(workdir, 6, kind)
  before = _tree_listing(workdir)
  with caplog.at_level(logging.WARNING, logger="jaxvol"):
    found = ckpt_lib.restore_selected(workdir, "latest")
  assert found.step == 4 and int(found.state["step"]) == 4
  assert "latest checkpoint (step 4)" in found.why and "skipped: 6" in found.why
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1, warnings
  # One line naming the step, the path and the reason; then the next one tried.
  assert "step 6" in warnings[0] and os.path.join(workdir, "checkpoints", "6") in warnings[0]
  assert "trying step 4" in warnings[0] and "\n" not in warnings[0]
  # The parameters are step 4's, untouched by the damage of step 6.
  ref = ckpt_lib.restore_selected(src, 4)
  for a, b in zip(jax.tree.leaves(found.state), jax.tree.leaves(ref.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A damaged step chosen by number is one clear error, no fallback.
  with pytest.raises(CheckpointError, match=r"step 6: ") as e:
    ckpt_lib.restore_selected(workdir, 6)
  assert "\n" not in str(e.value)
  assert _tree_listing(workdir) == before  # readers move and delete nothing


@pytest.mark.parametrize("kind", DAMAGE)
def test_train_resumes_from_the_previous_step_and_keeps_the_damage_aside(run, tmp_path, kind,
                                                                          caplog):
  store, src = run
  workdir = _copy(src, tmp_path)
  damage(workdir, 6, kind)
  with caplog.at_level(logging.INFO, logger="jaxvol"):
    result = loop.train(_config(store / "store", 8), workdir)
  assert result["step"] == 8
  messages = [r.getMessage() for r in caplog.records]
  assert any("step 6" in m and "does not restore" in m and "trying step 4" in m
             for m in messages), messages
  assert any("resumed from" in m and "at step 4" in m for m in messages), messages
  names = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  assert names == ["4", "6", "6.damaged", "8"], names  # 6 trained again; the damaged one kept
  # Retrained step 6 and step 8 restore, and carry checksums.
  for step in (6, 8):
    assert os.path.exists(os.path.join(workdir, "checkpoints", str(step), ckpt_lib.CHECKSUMS))
  assert ckpt_lib.restore_selected(workdir, "latest").step == 8
  assert not os.path.exists(os.path.join(workdir, lock_lib.LOCK_NAME))  # released


def test_evaluate_and_predict_use_the_previous_step_and_say_so(run, tmp_path):
  store, src = run
  workdir = _copy(src, tmp_path)
  damage(workdir, 6, "overwritten_bytes")
  c = _config(store / "store", 6)
  c.eval.references = ""
  summary = evaluate.evaluate(c, workdir)
  assert summary["checkpoint_step"] == 4
  assert "step 4" in summary["checkpoint"] and "skipped: 6" in summary["checkpoint"]
  record = predict_lib.predict(workdir, [str(store / "s2_low.nii.gz")], str(tmp_path / "out"))
  assert record["checkpoint_step"] == 4
  assert "step 4" in record["checkpoint"] and "skipped: 6" in record["checkpoint"]


def _cli(args, cwd, timeout=300):
  return subprocess.run([sys.executable, "-m", "jaxvol", *args], cwd=cwd, env=ENV,
                        capture_output=True, text=True, timeout=timeout, check=False)


def test_every_checkpoint_damaged_is_one_line_exit_1_and_writes_nothing(run, tmp_path):
  store, src = run
  workdir = _copy(src, tmp_path)
  for step, kind in zip((2, 4, 6), ("deleted_metadata", "truncated_data", "overwritten_bytes")):
    damage(workdir, step, kind)
  before = _tree_listing(workdir)
  common = ["--config=ppdm_pet_denoise:smoke", f"--workdir={workdir}",
            f"--config.data.store={store / 'store'}", "--config.mesh.data=1"]
  for mode in ("evaluate", "train"):
    out = _cli([mode, *common], tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no checkpoint under" in errors[0], out.stderr
    assert all(f"step {s}:" in errors[0] for s in (2, 4, 6)), errors[0]
    assert "Traceback" not in out.stderr + out.stdout
    assert "Event loop is closed" not in out.stderr + out.stdout
    assert out.stderr.rstrip().splitlines()[-1] == errors[0]  # nothing after the line
    assert _tree_listing(workdir) == before, mode  # nothing written, nothing moved
  status = predict_lib.main(["--workdir", workdir, "--input", str(store / "s2_low.nii.gz"),
                             "--output", str(tmp_path / "p")])
  assert status == 1 and not os.path.exists(tmp_path / "p")


SAVE_FAILS = textwrap.dedent("""
    import json, os, resource, signal, sys
    import jax.numpy as jnp
    from jaxvol.errors import CheckpointError
    from jaxvol.train import checkpoint as ckpt_lib
    workdir, mode = sys.argv[1], sys.argv[2]
    state = {"w": jnp.arange(50_000, dtype=jnp.float32)}
    ck = ckpt_lib.Checkpointer(workdir, keep=1, async_save=mode == "async", with_data=False)
    ck.save(1, state, {"n": 1})
    ck.save(2, state | {"w": state["w"] + 2}, {"n": 2})
    ck.wait()
    # Files may grow to 1 KB only from here on: writes fail with EFBIG ("File too large"), as
    # on a full disk; root included.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))
    error = None
    try:
      ck.save(3, state | {"w": state["w"] + 3}, {"n": 3})
      ck.wait()
    except CheckpointError as e:
      error = str(e)
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    ck.close()
    step, restored, meta = ckpt_lib.Checkpointer(workdir, with_data=False, async_save=False,
                                                 create=False).restore_newest()
    print(json.dumps({"error": error, "listing": sorted(os.listdir(ck.directory)),
                      "step": int(step), "first": float(restored["w"][0]), "meta": meta}))
""")


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_save_that_cannot_be_written_is_one_line_and_keeps_the_last_good_one(tmp_path, mode):
  out = subprocess.run([sys.executable, "-c", SAVE_FAILS, str(tmp_path / "w"), mode], env=ENV,
                       capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr
  record = json.loads(out.stdout.strip().splitlines()[-1])
  error = record["error"]
  assert error and "\n" not in error, record
  assert error.startswith(f"saving checkpoint step 3 to {tmp_path / 'w' / 'checkpoints'} failed")
  assert "File too large" in error and "earlier checkpoints are intact (2)" in error
  # Retention (keep 1) never deleted step 2 for the unverified step 3; nothing of 3 remains
  # under its name (moved aside or removed), and 2 restores.
  assert "2" in record["listing"] and "3" not in record["listing"], record
  assert not any("tmp" in name for name in record["listing"]), record
  assert record["step"] == 2 and record["first"] == 2.0 and record["meta"] == {"n": 2}


def test_a_second_train_on_a_held_workdir_refuses_and_the_first_finishes(tiny_store, tmp_path):  # pylint: disable=redefined-outer-name
  workdir = tmp_path / "w"
  common = ["train", "--config=ppdm_pet_denoise:smoke", f"--workdir={workdir}",
            f"--config.data.store={tiny_store / 'store'}", "--config.mesh.data=1",
            "--config.train.log_every=1"]
  with RunningCli([*common, "--config.train.steps=100000",
                   "--config.train.time_limit_minutes=0.4",
                   "--config.train.checkpoint_every=100000"], tmp_path) as first:
    first.wait_for(" step 1/100000", timeout=180)
    holder = json.loads((workdir / lock_lib.LOCK_NAME).read_text())
    assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
    second = _cli([*common, "--config.train.steps=4"], tmp_path)
    assert first.proc.poll() is None, "the first run ended before the second tried"
    status = first.proc.wait(timeout=300)
  out = first.out
  assert second.returncode == 1, second.stdout + second.stderr
  assert second.stderr.strip().splitlines()[-1].startswith("error: ")
  assert f"in use by another training run (PID {first.pid} on host" in second.stderr
  assert "Traceback" not in second.stderr
  assert status == 0 and "time limit" in out and "Traceback" not in out, out
  assert not (workdir / lock_lib.LOCK_NAME).exists()
  steps = ckpt_lib.Checkpointer(str(workdir), with_data=False, create=False).all_steps()
  stopped = int(out.split("stopped at step ")[1].split()[0])
  assert steps == [stopped]  # the first run's checkpoint, untouched by the second


def test_lock_is_exclusive_stale_locks_are_taken_over_and_other_hosts_need_force(tmp_path,
                                                                                 caplog):
  workdir = str(tmp_path / "w")
  with lock_lib.WorkdirLock(workdir) as held:
    assert held.held and json.loads(open(held.path).read())["pid"] == os.getpid()
    with pytest.raises(WorkdirLockedError, match=f"PID {os.getpid()} on host"):
      lock_lib.WorkdirLock(workdir).acquire()
  assert not os.path.exists(os.path.join(workdir, lock_lib.LOCK_NAME))
  # A holder on this host whose process is gone: taken over with a warning.
  dead = subprocess.Popen(["true"])
  dead.wait()
  path = os.path.join(workdir, lock_lib.LOCK_NAME)
  with open(path, "w") as f:
    json.dump({"host": socket.gethostname(), "pid": dead.pid, "started": time.time()}, f)
  with caplog.at_level(logging.WARNING, logger="jaxvol"):
    with lock_lib.WorkdirLock(workdir) as held:
      assert json.loads(open(path).read())["pid"] == os.getpid()
  assert any("whose process is gone" in r.getMessage() for r in caplog.records)
  # Another host's lock: refused (its processes cannot be seen from here) unless forced.
  with open(path, "w") as f:
    json.dump({"host": "another-node", "pid": 1, "started": time.time()}, f)
  with pytest.raises(WorkdirLockedError, match="another host.*--force"):
    lock_lib.WorkdirLock(workdir).acquire()
  with lock_lib.WorkdirLock(workdir, force=True):
    assert json.loads(open(path).read())["host"] == socket.gethostname()
  assert not os.path.exists(path)
  # A half-written lock file (its writer killed mid-write) counts as stale.
  with open(path, "w") as f:
    f.write('{"host": ')
  with lock_lib.WorkdirLock(workdir):
    pass
