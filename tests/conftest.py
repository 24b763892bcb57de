"""Test setup: four fake CPU devices, and the location of the optional shared real volumes."""

import importlib.util
import os
import pathlib

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
