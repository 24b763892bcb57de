"""Test setup: four fake CPU devices, and the location of the optional shared real volumes."""

import importlib.util
import os
import pathlib
import sys

# Four fake CPU devices for sharding tests. LLVM optimisation level 0 cuts XLA's CPU compile
# time (which dominates these tests) by 2-5x; the tiny test networks run as fast either way.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

# Identical programs compiled again (every loop.train call builds fresh closures) hit this cache.
jax.config.update("jax_compilation_cache_dir", os.path.join(
    os.environ.get("TMPDIR", "/tmp"), f"jaxvol-test-cache-{os.getuid()}"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
# The experiment scripts import their siblings by name, as `python experiments/NAME.py` allows
# (its folder is the first entry of sys.path); tests load them by path, so the folder goes here.
sys.path.insert(0, str(ROOT / "experiments"))


@pytest.fixture(scope="session")
def shared_data():
  """Path of ../shared/data; tests that need it skip with a reason when it is absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real volumes not found at {SHARED_DATA} (only present beside the project checkout)")
  return SHARED_DATA


def load_module(path, name: str):
  """Imports a script or config file (experiments/, tools/, configs/) as module `name`."""
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def write_pet_store(root, shape, splits, seed: int = 0) -> str:
  """A paired PET store under root/store: one subject per entry of `splits` ("train"/"test"),
  a smooth gamma-field activity (`pet_full`) and its noisy copy (`pet_low`, the input, whose
  scale `pet_full` shares), 2 mm voxels. Returns the store's path."""
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  from jaxvol.data import store as store_lib  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(root)
  rng = np.random.default_rng(seed)
  rows = []
  for i, split in enumerate(splits):
    clean = ndimage.gaussian_filter(rng.gamma(2.0, 1.0, shape), 2.0).astype(np.float32) * 10
    noisy = np.maximum(clean + rng.normal(0, 1.0, shape), 0).astype(np.float32)
    for name, vol in (("low", noisy), ("full", clean)):
      nib.save(nib.Nifti1Image(vol, np.diag([2.0, 2.0, 2.0, 1.0])), root / f"s{i}_{name}.nii.gz")
    rows.append(f"s{i},{split},s{i}_low.nii.gz,s{i}_full.nii.gz")
  (root / "list.csv").write_text("subject,split,pet_low,pet_full\n" + "\n".join(rows) + "\n")
  store_lib.convert(root / "list.csv", root / "store",
                    {"pet_low": {"kind": "pet"}, "pet_full": {"kind": "pet", "ref": "pet_low"}})
  return str(root / "store")


def write_ct_store(root, affine, shape=(24, 24, 20), seed: int = 0) -> str:
  """A one-subject CT store under root/store (split "train"): smooth soft tissue in air, in HU,
  saved with `affine`. Returns the store's path."""
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  from jaxvol.data import store as store_lib  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(root)
  body = ndimage.gaussian_filter(np.random.default_rng(seed).normal(0, 1, shape), 2.0)
  hu = np.where(body > -0.05, 40 + 400 * body, -1000).astype(np.float32)
  nib.save(nib.Nifti1Image(hu, np.asarray(affine, np.float64)), root / "ct.nii.gz")
  (root / "list.csv").write_text("subject,split,ct\nct0,train,ct.nii.gz\n")
  store_lib.convert(root / "list.csv", root / "store", {"ct": {"kind": "ct"}})
  return str(root / "store")


# `jaxvol` run as a user runs it, in its own process: unbuffered output, the suite's persistent
# compilation cache (so a subprocess does not recompile what an earlier one compiled).
CLI_ENV = dict(os.environ, PYTHONUNBUFFERED="1",
               JAX_COMPILATION_CACHE_DIR=os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                      f"jaxvol-test-cache-{os.getuid()}"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")


class RunningCli:
  """`python -m jaxvol ARGS` started in the background; its output lines collected as they come.

  Use as a context manager: leaving it kills the process if it still runs and joins the reader.
  """

  def __init__(self, args, cwd):
    import subprocess  # pylint: disable=import-outside-toplevel
    import sys  # pylint: disable=import-outside-toplevel
    import threading  # pylint: disable=import-outside-toplevel
    self.proc = subprocess.Popen([sys.executable, "-m", "jaxvol", *map(str, args)], cwd=cwd,
                                 env=CLI_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
    self.lines = []
    self._reader = threading.Thread(
        target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")), daemon=True)
    self._reader.start()

  @property
  def pid(self) -> int:
    return self.proc.pid

  @property
  def out(self) -> str:
    return "".join(self.lines)

  def wait_for(self, text: str, timeout: float) -> None:
    """Returns once a line contains `text`; fails if the process ends or `timeout` passes."""
    import time  # pylint: disable=import-outside-toplevel
    deadline = time.time() + timeout
    while not any(text in line for line in list(self.lines)):
      assert self.proc.poll() is None, f"exited before {text!r}:\n{self.out}"
      assert time.time() < deadline, f"no {text!r} within {timeout:g} s:\n{self.out}"
      time.sleep(0.05)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()
    self._reader.join(timeout=10)
    return False
