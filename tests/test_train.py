"""End-to-end training: steps, sharding invariance, resume, preemption and NaN handling.

Runs the real trainer on the `test` variant (ResNet-18 at 64 px on the embedded photos) over the
8 fake CPU devices from conftest.py.
"""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh

from dense_ssl import checkpoint, config_errors, sharding, train
from dense_ssl import methods as methods_lib
from dense_ssl.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(method="densecl", **overrides):
  return config_errors.override(config_errors.load_config(f"configs/{method}.py:test"), overrides)


def _params(workdir):
  _, tree = checkpoint.load_raw(workdir)
  return tree


def _assert_trees_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("method", ["densecl", "houghcl"])
def test_train_steps_change_params_and_write_logs(method, tmp_path):
  config = _config(method, total_steps=2)
  state = train.run(config, str(tmp_path))
  assert int(state.step) == 2
  tree = _params(str(tmp_path))
  init = train.build(config, sharding.create_mesh(), num_examples=64).state
  changed = [not np.allclose(a, b) for a, b in
             zip(jax.tree.leaves(init.params), jax.tree.leaves(tree["params"]))]
  assert sum(changed) > 0.9 * len(changed)
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))
  assert os.path.exists(tmp_path / "config.json")
  exported = sorted(os.listdir(tmp_path / "export"))
  assert exported == ["backbone_detectron2.pkl", "backbone_torchvision.pth"], exported


def _one_step(config, mesh, batch):
  built = train.build(config, mesh, num_examples=160)
  init = jax.device_get(built.state.params)
  with jax.set_mesh(mesh):
    new_state, metrics = built.step(built.state, sharding.to_global(batch, mesh))
  new_params = jax.device_get(new_state.params)
  update = jax.tree.map(lambda n, o: n - o, new_params, init)
  return update, jax.device_get(new_state.extra), jax.device_get(metrics)


@pytest.mark.parametrize("method", ["mocov2", "densecl", "byol", "univip"])
def test_one_and_eight_devices_give_the_same_step(method):
  """The sharded step computes what the 1-device step computes, shuffle-BN included.

  Tolerances: the loss agrees to 1e-5. Parameter updates are compared leaf by leaf relative to
  the update's norm: this tiny model (2x2 C5 maps, BatchNorm over 2 images per group) amplifies
  float32 reduction-order noise, and a 1- vs 8-device step with plain SyncBN (no grouping, no
  shard_map) differs by the same ~1% as the shuffle-BN step, so 2% is float noise here; a wrong
  permutation or group assignment changes updates by O(1).
  """
  config = _config(method)
  probe = methods_lib.create(config)
  batch = next(pipeline.create_iterator(config.data, views=probe.views(),
                                        sampler=probe.crop_sampler,
                                        global_batch_size=config.batch_size, seed=0))
  one = Mesh(np.array(jax.devices()[:1]), ("data",), axis_types=(AxisType.Auto,))
  u1, e1, m1 = _one_step(config, one, batch)
  u8, e8, m8 = _one_step(config, sharding.create_mesh(), batch)
  assert jax.device_count() == 8
  np.testing.assert_allclose(m1["train/loss"], m8["train/loss"], rtol=1e-5)
  # Leaves whose update is zero in exact arithmetic (a bias in front of a BatchNorm) carry only
  # rounding noise, ~1e-10 here: the floor is a millionth of the whole update, not of the leaf.
  floor = 1e-6 * np.sqrt(sum(np.sum(np.square(a)) for a in jax.tree.leaves(u1)))
  for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u8)):
    assert np.linalg.norm(a - b) <= 2e-2 * np.linalg.norm(a) + floor
  for a, b in zip(jax.tree.leaves(e1), jax.tree.leaves(e8)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)


# A constant learning rate makes the state independent of the run's length, so a run can be
# stopped early (or given an endless schedule and killed) and then continued to 12 steps.
_CONSTANT = {"optim.schedule": "constant", "checkpoint_every_steps": 2}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """An uninterrupted 12-step run."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  train.run(_config(total_steps=12, **_CONSTANT), workdir)
  return _params(workdir)


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(reference_run, tmp_path, caplog):
  train.run(_config(total_steps=4, **_CONSTANT), str(tmp_path))
  with caplog.at_level(logging.INFO, logger="absl"):
    state = train.run(_config(total_steps=12, **_CONSTANT), str(tmp_path))
  # It continued from step 4: retraining from step 0 would give the same parameters.
  assert "Resumed from the checkpoint of step 4" in caplog.text
  assert int(state.step) == 12
  _assert_trees_equal(reference_run, _params(str(tmp_path)))


# BYOL and UniVIP: their cosine EMA schedule depends on the run's length, so it is held
# constant too (the schedule itself is tested in tests/test_byol.py).
_CONSTANT_EMA = {**_CONSTANT, "method.momentum_schedule": "constant"}


@pytest.mark.parametrize("method", ["byol", "univip"])
def test_resume_is_bitwise_for_byol_and_univip(method, tmp_path, caplog):
  # Two runs, not three (each costs these methods a minute of set-up on CI): the resumed run
  # starts from a copy of the reference run's workdir without its last checkpoint.
  reference, work = str(tmp_path / "reference"), str(tmp_path / "resumed")
  train.run(_config(method, total_steps=4, **_CONSTANT_EMA), reference)
  assert checkpoint.saved_steps(reference) == [2, 4]
  shutil.copytree(reference, work)
  shutil.rmtree(os.path.join(work, "checkpoints", "4"))
  assert checkpoint.saved_steps(work) == [2]
  with caplog.at_level(logging.INFO, logger="absl"):
    state = train.run(_config(method, total_steps=4, **_CONSTANT_EMA), work)
  # It continued from step 2: retraining from step 0 would give the same parameters.
  assert "Resumed from the checkpoint of step 2" in caplog.text
  assert int(state.step) == 4
  _assert_trees_equal(_params(reference), _params(work))


def _main(workdir, *flags):
  return [sys.executable, "-m", "dense_ssl.main", "--config=configs/densecl.py:test",
          f"--workdir={workdir}", *flags]


def _wait_for_checkpoint(workdir, step, proc, timeout=900):
  path = os.path.join(workdir, "checkpoints", str(step))
  start = time.time()
  while not os.path.exists(path):
    assert proc.poll() is None, proc.stdout.read()
    assert time.time() - start < timeout
    time.sleep(0.2)


def test_sigkill_then_rerun_continues_bitwise(reference_run, tmp_path):
  work = str(tmp_path)
  flags = ["--config.checkpoint_every_steps=2", "--config.optim.schedule=constant"]
  proc = subprocess.Popen(_main(work, *flags, "--config.total_steps=100000"), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  _wait_for_checkpoint(work, 2, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  out = subprocess.run(_main(work, *flags, "--config.total_steps=12"), cwd=ROOT,
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Resumed from the checkpoint of step" in out.stderr
  _assert_trees_equal(reference_run, _params(work))


# Runs the entrypoint with orbax's final rename (tmp dir -> <step>) replaced by a SIGKILL of the
# process for one step: the process dies mid-save after writing all the data, the most
# tempting moment to leave a checkpoint that looks complete. (orbax internals: if they move,
# this fails loudly rather than silently testing nothing.)
_KILL_AT_RENAME = """
import os, runpy, signal, sys
from orbax.checkpoint._src.path import async_path
_rename = async_path.rename
async def rename(src, dst):
  if dst.name == os.environ["KILL_AT_STEP"]:
    os.kill(os.getpid(), signal.SIGKILL)
  return await _rename(src, dst)
async_path.rename = rename
sys.argv = ["dense_ssl.main"] + sys.argv[1:]
runpy.run_module("dense_ssl.main", run_name="__main__")
"""


def test_kill_during_a_checkpoint_write_resumes_from_the_previous_one(reference_run, tmp_path):
  work = str(tmp_path)
  flags = ["--config.checkpoint_every_steps=2", "--config.optim.schedule=constant"]
  cmd = [sys.executable, "-c", _KILL_AT_RENAME] + _main(work, *flags,
                                                        "--config.total_steps=100000")[3:]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                        env={**os.environ, "KILL_AT_STEP": "4"})
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  entries = os.listdir(os.path.join(work, "checkpoints"))
  assert "2" in entries and "4" not in entries, entries
  assert any(e.startswith("4.") and "tmp" in e for e in entries), entries  # the half-save
  out = subprocess.run(_main(work, *flags, "--config.total_steps=12"), cwd=ROOT,
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Resumed from the checkpoint of step 2 " in out.stderr
  _assert_trees_equal(reference_run, _params(work))


def test_sigterm_saves_a_checkpoint_and_exits_75(tmp_path):
  work = str(tmp_path)
  proc = subprocess.Popen(_main(work, "--config.total_steps=100000",
                                "--config.checkpoint_every_steps=100000"), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  log = ""
  start = time.time()
  while "First step" not in log:
    line = proc.stdout.readline()
    assert line or proc.poll() is None, log
    log += line
    assert time.time() - start < 600
  proc.send_signal(signal.SIGTERM)
  rest, _ = proc.communicate(timeout=300)
  assert proc.returncode == train.PREEMPTED_EXIT_CODE, log + rest
  # What keeps the save inside a preemption grace period (30 s on GCE spot VMs) is that few
  # steps are ever in flight: the signal came after step 1, so the loop must stop within the
  # dispatched steps (MAX_IN_FLIGHT) plus the one that saw the signal, and a slack step for
  # this test reading the log late. Seconds are not asserted: on a loaded CI machine they
  # measure the machine (benchmarks do timing).
  saved_step = int(re.search(r"saved the checkpoint of step (\d+) [\d.]+s after", rest)[1])
  assert 1 <= saved_step <= 1 + train.MAX_IN_FLIGHT + 2, rest
  steps = [int(d) for d in os.listdir(os.path.join(work, "checkpoints")) if d.isdigit()]
  assert max(steps) == saved_step, steps


@pytest.mark.parametrize("policy", ["stop", "skip_step"])
def test_non_finite_steps_never_reach_the_checkpoint(policy, tmp_path):
  # A huge learning rate blows the parameters up after the first update.
  config = _config("mocov2", total_steps=4, nan_policy=policy, checkpoint_every_steps=1,
                   log_every_steps=1, **{"optim.lr": 1e30})
  if policy == "stop":
    with pytest.raises(train.NonFiniteError, match=r"at step \d+; the run stopped"):
      train.run(config, str(tmp_path))
  else:
    state = train.run(config, str(tmp_path))
    assert int(state.step) == 4
  assert checkpoint.all_finite(_params(str(tmp_path)))


@pytest.mark.parametrize("override,expected", [
    ({"method.name": "densecll"}, "valid choices: .*densecl,"),
    ({"model.name": "resnet5"}, "valid choices:"),
    ({"model.name": "vit_s16"}, "cannot be used by method 'densecl'; valid choices: resnet101, resnet18"),
    ({"batch_size": 12}, "multiple of the device count"),
    ({"method.queue_size": 40}, "multiple of config.batch_size=16"),
    ({"data.image_size": 72}, "not a multiple of the backbone.s stride 32"),
    ({"nan_policy": "ignore"}, "valid choices: stop, skip_step"),
])
def test_bad_configs_fail_before_compiling(override, expected, tmp_path):
  with pytest.raises(ValueError, match=expected):
    train.check_config(_config(**override), jax.device_count())


def test_evaluators_of_config_evals_run_during_training(tmp_path):
  """config.evals runs on the initialisation, every eval_every_steps and at the end: logged and
  written per step."""
  tiny_corr = {"type": "correspondence", "num_pairs": 4, "scene_size": 96, "image_size": 96}
  config = _config("mocov2", total_steps=3, eval_every_steps=2, evals={"corr": tiny_corr})
  train.run(config, str(tmp_path))
  for step in (0, 2, 3):
    with open(tmp_path / f"eval_{step}.json") as f:
      results = json.load(f)
    assert results["step"] == step
    assert 0.0 <= results["corr/argmax_acc_exact"] <= results["corr/argmax_acc"] <= 1.0
    assert 0.0 < results["corr/chance_acc"] < 1.0
    assert results["z/secs/corr"] > 0
  assert not (tmp_path / "eval_1.json").exists()


def test_a_bad_evaluator_config_fails_before_training(tmp_path):
  config = _config("mocov2", evals={"probe": {"type": "linaer"}})
  with pytest.raises(ValueError, match=r"config.evals: Unknown evaluator type 'linaer' .*valid choices: "):
    train.run(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints")
