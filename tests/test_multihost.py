"""Two processes on loopback train exactly like one: gloo CPU collectives stand in for two hosts.

tests/multihost_driver.py runs one "host" (2 fake CPU devices each, jaxvol.train.distributed,
jaxvol.train.loop); the in-process reference trains the same config on this process's 4 fake
devices, so both runs share the global batch and the mesh shape and differ only in the number
of hosts. The two-host checkpoint must also resume on one host, on another mesh.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import nibabel as nib
import numpy as np
import pytest

import multihost_driver
from test_train import _next_batch_after_restore
from test_train import _params
from test_train import tiny_store  # noqa: F401  (a fixture)
from jaxvol.eval import evaluate as evaluate_lib
from jaxvol.train import loop

# End to end (training runs, subprocesses or experiments): `pytest -m 'not slow'` skips it.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, "tests", "multihost_driver.py")
TIMEOUT_S = 300
STEPS, CHECKPOINT_EVERY, DEVICES_PER_HOST = 4, 2, 2


def _gloo_available() -> bool:
  try:
    from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return hasattr(_jax, "make_gloo_tcp_collectives")


def _free_port() -> int:
  try:
    import portpicker  # pylint: disable=g-import-not-at-top
    return portpicker.pick_unused_port()
  except ImportError:
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      return s.getsockname()[1]


def _driver_env() -> dict:
  env = dict(os.environ)
  # Set, not inherited: conftest's XLA_FLAGS fakes 4 devices per process, while each driver
  # fakes its own (jax_num_cpu_devices); the optimisation level matches the reference's code.
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
  # The coordinator and gloo talk over 127.0.0.1; a proxy in the environment must not see that.
  proxies = ("http_proxy", "https_proxy", "all_proxy", "grpc_proxy")
  for key in [k for k in env if k.lower() in proxies]:
    del env[key]
  return env


def _tail(path: str, n: int = 60) -> str:
  with open(path, errors="replace") as f:
    lines = [line for line in f.read().splitlines() if not line.startswith("[Gloo]")]
  return "\n".join(lines[-n:])


def launch(store, workdir: str, out: str, num_processes: int = 2) -> list[dict]:
  """Runs the driver as `num_processes` processes; returns their summaries or fails loudly."""
  os.makedirs(out, exist_ok=True)
  port = _free_port()
  procs, logs = [], []
  for i in range(num_processes):
    stdout, stderr = os.path.join(out, f"stdout_{i}.txt"), os.path.join(out, f"stderr_{i}.txt")
    logs.append((stdout, stderr))
    cmd = [sys.executable, DRIVER, f"--process_id={i}", f"--num_processes={num_processes}",
           f"--port={port}", f"--cpu_devices={DEVICES_PER_HOST}", f"--store={store}",
           f"--workdir={workdir}", f"--out={out}", f"--steps={STEPS}",
           f"--checkpoint_every={CHECKPOINT_EVERY}"]
    with open(stdout, "w") as fo, open(stderr, "w") as fe:
      procs.append(subprocess.Popen(cmd, stdout=fo, stderr=fe, env=_driver_env(), cwd=ROOT))
  deadline = time.time() + TIMEOUT_S
  why = None
  while any(p.poll() is None for p in procs):
    if any(p.returncode not in (None, 0) for p in procs):
      why = "a process failed"  # the others would wait for it until their own timeouts
      break
    if time.time() > deadline:
      why = f"timed out after {TIMEOUT_S} s"
      break
    time.sleep(0.5)
  for p in procs:
    if p.poll() is None:
      p.kill()
    p.wait()
  if why or any(p.returncode for p in procs):
    report = "\n".join(f"--- process {i} (exit {p.returncode}) stderr:\n{_tail(logs[i][1])}\n"
                       f"--- process {i} stdout:\n{_tail(logs[i][0], 10)}"
                       for i, p in enumerate(procs))
    pytest.fail(f"multi-process run: {why or 'non-zero exit'}\n{report}", pytrace=False)
  summaries = []
  for stdout, _ in logs:
    with open(stdout) as f:
      summaries.append(json.loads([line for line in f.read().splitlines()
                                   if line.startswith("{")][-1]))
  return summaries


@pytest.fixture(scope="module")
def two_hosts(tiny_store, tmp_path_factory):  # noqa: F811
  if not _gloo_available():
    pytest.skip("this jaxlib has no gloo CPU collectives: multi-process CPU runs are impossible")
  root = tmp_path_factory.mktemp("two_hosts")
  t0 = time.time()
  summaries = launch(tiny_store / "store", str(root / "work"), str(root / "out"))
  return dict(workdir=str(root / "work"), out=str(root / "out"), summaries=summaries,
              seconds=time.time() - t0)


@pytest.fixture(scope="module")
def one_host(tiny_store, tmp_path_factory):  # noqa: F811
  c = multihost_driver.run_config(tiny_store / "store", STEPS, CHECKPOINT_EVERY)
  if len(jax.devices()) != 2 * DEVICES_PER_HOST:
    pytest.skip(f"the reference needs {2 * DEVICES_PER_HOST} (fake) devices in this process")
  workdir = str(tmp_path_factory.mktemp("one_host") / "work")
  loop.train(c, workdir)
  return dict(workdir=workdir, config=c)


def _assert_trees_close(a, b, atol):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


def test_two_hosts_train_like_one(two_hosts, one_host):
  for i, s in enumerate(two_hosts["summaries"]):
    assert s == {"process": i, "processes": 2, "devices": 4, "local_devices": 2,
                 "train_step": STEPS, "eval_step": STEPS, "sampler": "VolumeSampler",
                 "sampler_processes": [0, 1], "halo_convolutions": s["halo_convolutions"]}
    assert s["halo_convolutions"] > 0
  (multi, step_m), (single, step_s) = _params(two_hosts["workdir"]), _params(one_host["workdir"])
  assert step_m == step_s == STEPS
  # Same global batch row for row: only the order of the cross-device sums may differ.
  _assert_trees_close(multi, single, atol=1e-6)
  # Evaluation restores the same EMA weights on every host, whatever mesh saved them.
  flat_ref = multihost_driver.flat(single["ema_params"])
  for i in range(2):
    with np.load(os.path.join(two_hosts["out"], f"params_{i}.npz")) as got:
      assert sorted(got.files) == sorted(flat_ref)
      for k in got.files:
        np.testing.assert_allclose(got[k], flat_ref[k], rtol=0, atol=1e-6)


def test_only_process_zero_writes(two_hosts):
  work, out = two_hosts["workdir"], two_hosts["out"]
  assert len(os.listdir(os.path.join(work, "tensorboard"))) == 1  # one event file, process 0's
  assert os.path.exists(os.path.join(work, "train_step_cost.json"))
  with open(os.path.join(out, "stderr_0.txt")) as f0, open(os.path.join(out, "stderr_1.txt")) as f1:
    log0, log1 = f0.read(), f1.read()
  assert f"step {STEPS}/{STEPS}" in log0 and "parameters.txt" in log0
  assert "step " not in log1 and "parameters" not in log1
  # Each host saved its own iterator state, and they agree.
  data = os.path.join(work, "checkpoints", str(STEPS), "data")
  states = []
  for i in range(2):
    with open(os.path.join(data, f"process_{i}-of-2.json")) as f:
      states.append(json.load(f))
  assert states[0] == states[1]


def test_two_host_checkpoint_resumes_on_one_device(two_hosts, one_host, tmp_path):
  # Keep the step-2 checkpoint only, then finish the run as one process on one device.
  workdir = str(tmp_path / "resumed")
  shutil.copytree(two_hosts["workdir"], workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", str(STEPS)))
  c = one_host["config"].copy_and_resolve_references()
  c.mesh.data = 1
  assert loop.train(c, workdir)["step"] == STEPS
  (resumed, _), (single, _) = _params(workdir), _params(one_host["workdir"])
  _assert_trees_close(resumed, single, atol=1e-5)
  # The iterator of two hosts continues on one at the same global batch.
  got = _next_batch_after_restore(c, workdir)
  want = _next_batch_after_restore(c, one_host["workdir"])
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])


def test_evaluation_split_over_two_hosts_equals_one_device(two_hosts, one_host, tmp_path):
  """Each host evaluated the 2-host checkpoint with every volume's depth over all 4 devices."""
  c = multihost_driver.eval_config(one_host["config"])
  evaluate_lib.predict_split(c, one_host["workdir"], c.eval.split, str(tmp_path), True)
  got_dir = os.path.join(two_hosts["workdir"], "eval")
  assert os.path.exists(os.path.join(got_dir, "summary.json"))
  names = sorted(os.listdir(os.path.join(tmp_path, "nifti")))
  assert names and sorted(os.listdir(os.path.join(got_dir, "nifti"))) == names
  for name in names:
    want = np.asarray(nib.load(os.path.join(tmp_path, "nifti", name)).dataobj)
    got = np.asarray(nib.load(os.path.join(got_dir, "nifti", name)).dataobj)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * float(np.abs(want).max()))
