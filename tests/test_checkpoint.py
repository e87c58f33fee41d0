"""Checkpoints load anywhere: written on 8 devices, resumed, exported, evaluated and drawn on 1,
and the other way round (dense_ssl/checkpoint.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

from dense_ssl import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = textwrap.dedent("""
    from configs import mocov2

    def get_config(arg=None):
      c = mocov2.get_config("test")
      c.unlock()
      c.evals = {"knn": {"type": "knn", "num_train": 40, "num_test": 20, "image_size": 32}}
      c.total_steps = 2
      c.lock()
      return c
""")


def _run(args, devices, timeout=1200):
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         "PYTHONPATH": ROOT}
  out = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout)
  assert out.returncode == 0, (args, out.stderr[-4000:])
  return out


def _use(work, devices, tmp_path, tag):
  """Export, evaluate and draw the newest checkpoint of `work` on `devices` devices."""
  _run(["dense_ssl.export", f"--workdir={work}", "--format=detectron2",
        f"--output={tmp_path / f'{tag}.pkl'}"], devices)
  out = _run(["dense_ssl.evaluate", f"--workdir={work}"], devices)
  assert "knn/top1" in out.stdout
  _run(["dense_ssl.visualize_matches", f"--workdir={work}", "--num_pairs=2", "--image_size=64",
        f"--output={tmp_path / f'{tag}.png'}"], devices)
  assert (tmp_path / f"{tag}.png").stat().st_size > 1000


def test_a_checkpoint_moves_between_device_counts(tmp_path):
  config = tmp_path / "config.py"
  config.write_text(CONFIG)
  work = tmp_path / "run"
  main = ["dense_ssl.main", f"--config={config}", f"--workdir={work}"]

  trained = _run(main, devices=8)
  assert "over 8 devices" in trained.stderr
  _use(work, 1, tmp_path, "from8")  # saved on 8 devices, used on 1

  resumed = _run(main + ["--config.total_steps=3"], devices=1)
  assert "over 1 devices" in resumed.stderr
  assert "Resumed from the checkpoint of step 2" in resumed.stderr
  _use(work, 8, tmp_path, "from1")  # saved on 1 device, used on 8

  # The file exported on 8 devices from the 1-device checkpoint is that checkpoint's backbone.
  import pickle  # pylint: disable=g-import-not-at-top
  with open(tmp_path / "from1.pkl", "rb") as f:
    exported = pickle.load(f)["model"]
  _, tree = checkpoint.load_raw(str(work))
  assert int(tree["step"]) == 3
  np.testing.assert_array_equal(exported["stem.conv1.weight"],
                                tree["params"]["backbone"]["conv1"]["kernel"].transpose(3, 2, 0, 1))
  assert json.loads((work / "eval_3.json").read_text())["step"] == 3
