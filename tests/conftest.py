"""Test setup: four fake CPU devices, and the location of the optional shared real volumes."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data():
  """Path of ../shared/data; tests that need it skip with a reason when it is absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real volumes not found at {SHARED_DATA} (only present beside the project checkout)")
  return SHARED_DATA
