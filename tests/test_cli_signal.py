"""`jaxvol train` stopped by SIGTERM, as a scheduler stops it: a real process, its exit status,
its output and the checkpoint it leaves."""

import os
import re
import signal

import pytest

from conftest import RunningCli
from test_train import tiny_store  # noqa: F401  pylint: disable=unused-import

# End to end (training runs, subprocesses or experiments): `pytest -m 'not slow'` skips it.
pytestmark = pytest.mark.slow

STEP_LINE = re.compile(r"step (\d+)/100000 ")


def test_sigterm_stops_within_steps_saves_and_exits_143(tiny_store, tmp_path):  # pylint: disable=redefined-outer-name
  workdir = tmp_path / "w"
  with RunningCli(["train", "--config=ppdm_pet_denoise:smoke", f"--workdir={workdir}",
                   f"--config.data.store={tiny_store / 'store'}", "--config.train.steps=100000",
                   "--config.train.log_every=1", "--config.train.checkpoint_every=100000",
                   "--config.mesh.data=1"], tmp_path) as run:
    run.wait_for("step 1/100000", timeout=120)
    # The newest step the process has reported when the signal goes out.
    seen = max(int(m.group(1)) for line in list(run.lines) if (m := STEP_LINE.search(line)))
    run.proc.send_signal(signal.SIGTERM)
    status = run.proc.wait(timeout=60)
  out = run.out
  assert status == 128 + signal.SIGTERM == 143, out
  assert "Traceback" not in out, out
  last = max(int(m.group(1)) for m in STEP_LINE.finditer(out))
  stopped = re.search(r"stopped by signal 15 at step (\d+): checkpoint saved", out)
  assert stopped, out
  step = int(stopped.group(1))
  # It finishes the step in flight (at most two are: jaxvol.train.loop), logs it, saves, exits.
  assert step == last and seen <= step <= seen + 3, (seen, step, out)
  assert sorted(os.listdir(workdir / "checkpoints")) == [str(step)], out
