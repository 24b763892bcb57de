"""The training loop's own progress records (WORKDIR/progress.jsonl, result["progress"])."""

import json
import os
import shutil
import time

import pytest

from jaxvol.train import loop
from test_train import smoke_config
from test_train import tiny_store  # noqa: F401  pylint: disable=unused-import

# End to end (training runs, subprocesses or experiments): `pytest -m 'not slow'` skips it.
pytestmark = pytest.mark.slow

KEYS = {"step", "time", "seconds", "steps_per_s", "loss", "grad_norm"}


@pytest.fixture(scope="module")
def first_run(tiny_store, tmp_path_factory):  # pylint: disable=redefined-outer-name
  """4 steps, a progress line every 2 and a checkpoint every 2: (workdir, result, t0, t1)."""
  workdir = str(tmp_path_factory.mktemp("progress") / "w")
  c = smoke_config(tiny_store / "store", steps=4)
  c.train.log_every, c.train.checkpoint_every = 2, 2
  t0 = time.time()
  result = loop.train(c, workdir)
  return workdir, result, t0, time.time()


def test_records_at_the_progress_lines(first_run):
  workdir, result, t0, t1 = first_run
  records = result["progress"]
  assert [r["step"] for r in records] == [1, 2, 4]  # the first step, then every log_every
  assert all(set(r) == KEYS for r in records)
  assert loop.read_progress(workdir) == json.loads(json.dumps(records))
  times = [r["time"] for r in records]
  seconds = [r["seconds"] for r in records]
  assert t0 < times[0] < times[1] < times[2] < t1
  assert 0 < seconds[0] < seconds[1] < seconds[2] < t1 - t0
  # One clock: within a run, training seconds advance exactly as wall time does.
  for r in records[1:]:
    assert r["seconds"] - records[0]["seconds"] == pytest.approx(r["time"] - times[0], abs=1e-6)
  for a, b in zip(records, records[1:]):  # steps/s of each window from its own clock
    assert b["steps_per_s"] == pytest.approx((b["step"] - a["step"]) / (b["time"] - a["time"]),
                                             rel=1e-6)
  assert records[-1]["loss"] == result["loss"] and records[-1]["grad_norm"] == result["grad_norm"]
  with open(os.path.join(workdir, "train_step_cost.json")) as f:
    cost = json.load(f)
  assert 0 < cost["compile_seconds"] < times[0] - t0 and cost["flops"] > 0


def test_resumed_run_continues_the_clock_without_duplicates(tiny_store, first_run, tmp_path):  # pylint: disable=redefined-outer-name
  src, _, _, _ = first_run
  workdir = str(tmp_path / "w")
  shutil.copytree(src, workdir)
  before = loop.read_progress(workdir)
  path = os.path.join(workdir, loop.PROGRESS_FILE)
  # An earlier run's training time (the resumed step's record is where the clock continues), then
  # the records of a run that died after its last checkpoint (step 4): a whole one, and one cut
  # short while being written.
  before[-1]["seconds"] += 1000.0
  lines = [json.dumps(r) + "\n" for r in before]
  lines.append(json.dumps(dict(before[-1], step=6, seconds=5000.0)) + "\n")
  lines.append('{"step": 7, "time": 1')
  with open(path, "w") as f:
    f.write("".join(lines))
  assert [r["step"] for r in loop.read_progress(workdir)] == [1, 2, 4, 6]

  c = smoke_config(tiny_store / "store", steps=8)
  c.train.log_every, c.train.checkpoint_every = 2, 2
  result = loop.train(c, workdir)
  assert result["step"] == 8
  new = result["progress"]
  assert [r["step"] for r in new] == [5, 6, 8]  # the first step of this call, then every 2
  records = loop.read_progress(workdir)
  assert [r["step"] for r in records] == [1, 2, 4, 5, 6, 8]
  assert records[:3] == before and records[3:] == json.loads(json.dumps(new))
  seconds = [r["seconds"] for r in records]
  assert seconds == sorted(seconds) and len(set(seconds)) == len(seconds)
  # The clock continued from the record of step 4, not from the dead run's, nor from 0: the
  # gap holds step 5 only, less than the wall time between them (this call's setup and
  # compilation are not training time).
  gap = new[0]["seconds"] - before[-1]["seconds"]
  assert 0 < gap < new[0]["time"] - before[-1]["time"]
  assert max(seconds) < 5000.0
  with open(path) as f:
    assert f.read().endswith("}\n")


def test_no_records_before_a_run(tmp_path):
  assert loop.read_progress(str(tmp_path)) == []
