"""2 processes x 4 CPU devices (jax.distributed on localhost) train like 1 process x 8 devices.

Each process reads only its half of every global batch (per-process input sharding), so this
checks the multi-host input path, the distributed mesh and checkpointing together.
"""

import os
import pickle
import re
import socket
import subprocess
import sys

import numpy as np


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--config=configs/densecl.py:test", "--config.total_steps=3",
         "--config.checkpoint_every_steps=3"]


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env["PYTHONPATH"] = ROOT
  return env


def test_two_processes_match_one_process(tmp_path):
  single = str(tmp_path / "single")
  out = subprocess.run([sys.executable, "-m", "dense_ssl.main", *FLAGS, f"--workdir={single}"],
                       cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=1200)
  assert out.returncode == 0, out.stderr[-3000:]

  multi = str(tmp_path / "multi")
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "dense_ssl.main", *FLAGS, f"--workdir={multi}",
       f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = [p.communicate(timeout=1200)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  assert "process 0 of 2" in logs[0] and "process 1 of 2" in logs[1]
  assert sorted(os.listdir(os.path.join(multi, "export"))) == sorted(
      os.listdir(os.path.join(single, "export")))

  # Compare the exported backbones: the checkpoint of the 2-process run is laid out for that
  # topology, while the export is plain numpy written by process 0.
  def backbone(workdir):
    with open(os.path.join(workdir, "export", "backbone_detectron2.pkl"), "rb") as f:
      return pickle.load(f)["model"]
  a, b = backbone(single), backbone(multi)
  assert sorted(a) == sorted(b)
  for name in a:
    # Float32 reduction-order noise as in the 1-vs-8-device step test. Since the step compiles
    # with XLA's own convolutions (dense_ssl/xla_cpu.py) the stem's weight gradient sums in a
    # layout-dependent order: measured max 9e-4 on the stem after the test's steps.
    np.testing.assert_allclose(a[name], b[name], rtol=1e-3, atol=1.5e-3, err_msg=name)


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
  """Preemption across processes: JAX's sync point, no collective per step (train.py).

  SIGTERM reaches process 1 only; the preemption service agrees on a step, both processes save
  the same checkpoint there and exit with the requeue code.
  """
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  work = str(tmp_path / "run")
  port = _free_port()
  flags = ["--config=configs/mocov2.py:test", "--config.total_steps=100000",
           "--config.checkpoint_every_steps=100000", f"--workdir={work}",
           f"--coordinator_address=localhost:{port}", "--num_processes=2"]
  outputs = [open(tmp_path / f"log{i}.txt", "w") for i in range(2)]  # pylint: disable=consider-using-with
  procs = [subprocess.Popen([sys.executable, "-m", "dense_ssl.main", *flags, f"--process_id={i}"],
                            cwd=ROOT, env=_env(4), stdout=outputs[i], stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  start = time.time()
  while "First step" not in (tmp_path / "log1.txt").read_text():
    assert all(p.poll() is None for p in procs), (tmp_path / "log1.txt").read_text()[-3000:]
    assert time.time() - start < 1200
    time.sleep(0.5)
  procs[1].send_signal(signal.SIGTERM)
  for p in procs:
    p.wait(timeout=600)
  for f in outputs:
    f.close()
  logs = [(tmp_path / f"log{i}.txt").read_text() for i in range(2)]
  for p, text in zip(procs, logs):
    assert p.returncode == 75, text[-3000:]
  saved = [int(re.search(r"saved the checkpoint of step (\d+) at the agreed step", text)[1])
           for text in logs]
  assert saved[0] == saved[1]
  steps = [int(d) for d in os.listdir(os.path.join(work, "checkpoints")) if d.isdigit()]
  assert steps == [saved[0]]
