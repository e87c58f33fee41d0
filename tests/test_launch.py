"""Launch scripts: shellcheck-clean, and their dry-run output carries the right commands.

No gcloud, srun or GPU is needed. Dry runs print every command as "+ ..." on stdout, with
simulated query results (DRY_RUN_STATES, DRY_RUN_JOB_STATUS, DRY_RUN_EXIT_CODES,
DRY_RUN_EXIT_CODE). The restart and requeue loops of gpu.sh and slurm.sbatch, and the worker side
of tpu_vm.sh, also run for real against fake trainers, a fake srun and a fake scontrol.
"""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU = ROOT / "launch" / "tpu_vm.sh"
GPU = ROOT / "launch" / "gpu.sh"
SLURM = ROOT / "launch" / "slurm.sbatch"
SCRIPTS = [TPU, GPU, SLURM]
# Shell scripts outside launch/ that are held to the same shellcheck standard.
OTHER_SCRIPTS = [ROOT / "benchmarks" / "device_check.sh", ROOT / ".ci" / "newest_jax",
                 ROOT / ".ci" / "lock"]
_DRY_ENV = ("DRY_RUN", "DRY_RUN_STATES", "DRY_RUN_JOB_STATUS", "DRY_RUN_EXIT_CODES",
            "DRY_RUN_EXIT_CODE", "TPU_NAME", "TPU_ZONE", "TPU_PROJECT", "TPU_ACCELERATOR_TYPE",
            "TPU_RUNTIME_VERSION", "REPO_URL", "REPO_REF", "GPUS_PER_NODE",
            "XLA_PYTHON_CLIENT_MEM_FRACTION", "CUDA_VISIBLE_DEVICES")


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if k not in _DRY_ENV and not k.startswith("SLURM_")}
  env.update(extra)
  return env


def _run(script, *args, check=True, **env):
  result = subprocess.run(["bash", str(script), *args], capture_output=True, text=True,
                          env=_env(**env), timeout=60, check=False)
  if check:
    assert result.returncode == 0, result.stderr
  return result


def _commands(result):
  """The "+ ..." lines of a dry run; asserts that stdout holds nothing else."""
  lines = result.stdout.splitlines()
  assert lines and all(line.startswith("+ ") for line in lines), result.stdout
  return lines


def _one(lines, *pieces):
  """The single line containing all of `pieces`."""
  found = [line for line in lines if all(p in line for p in pieces)]
  assert len(found) == 1, f"{pieces} in {len(found)} lines:\n" + "\n".join(lines)
  return found[0]


def _shellcheck():
  exe = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable), "shellcheck")
  assert os.path.exists(exe), 'shellcheck is missing: pip install "dense_ssl[test]"'
  return exe


@pytest.mark.parametrize("script", SCRIPTS + OTHER_SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_clean(script):
  result = subprocess.run([_shellcheck(), "-s", "bash", "-S", "style", str(script)],
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help_and_strict_mode(script):
  text = script.read_text()
  assert text.startswith("#!") and "\nset -euo pipefail\n" in text
  result = _run(script, "--help")
  assert result.stdout.startswith("Usage:") and "--dry-run" in result.stdout
  bad = _run(script, "--dry-run", "--no-such-flag", check=False)
  assert bad.returncode == 2 and "unknown flag" in bad.stderr


# ------------------------------------------------------------------------------------------------
# TPU VM

TPU_ARGS = ["--dry-run", "--name=ssl-v4", "--zone=us-central2-b", "--project=my-proj",
            "--accelerator=v4-32", "--spot", "--config=configs/densecl.py",
            "--workdir=gs://bucket/runs/densecl", "--data_dir=gs://bucket/tfds", "--",
            "--config.batch_size=1024"]


def test_tpu_creates_copies_installs_and_starts_on_all_workers():
  lines = _commands(_run(TPU, *TPU_ARGS))
  where = ("ssl-v4", "--zone=us-central2-b", "--project=my-proj")
  _one(lines, "gcloud compute tpus tpu-vm describe", *where)
  _one(lines, "gcloud compute tpus tpu-vm create", *where, "--accelerator-type=v4-32",
       "--version=tpu-ubuntu2204-base", "--spot")
  tar = _one(lines, "tar -czf")
  assert f"-C {ROOT}" in tar and "--exclude=./.venv" in tar and "--exclude=./.git" in tar
  _one(lines, "tpu-vm scp", "ssl-v4:dense_ssl.tar.gz", "--worker=all", *where)
  install = _one(lines, "tpu-vm ssh", "--worker=all", "pip install", *where)
  # The package itself from the copied tree, at the lock's versions: no hand-kept list.
  assert 'pip install -q -c requirements.lock -e ".[tpu,torch]"' in install
  assert "--extra-index-url https://download.pytorch.org/whl/cpu" in install
  assert "-r " not in install and "jax[" not in install
  start = _one(lines, "tpu-vm ssh", "--worker=all", "dense_ssl.main", *where)
  for piece in ("launch/tpu_vm.sh worker-start", "python -m dense_ssl.main",
                "--config=configs/densecl.py", "--workdir=gs://bucket/runs/densecl",
                "--config.data.data_dir=gs://bucket/tfds", "--config.batch_size=1024"):
    assert piece in start
  assert lines.index(install) < lines.index(start)
  assert not any("delete" in line or "sleep" in line for line in lines)  # no --watch


@pytest.mark.parametrize("accelerator,runtime", [
    ("v4-8", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-64", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e")])
def test_tpu_runtime_version_follows_the_generation(accelerator, runtime):
  args = ["--dry-run", "--zone=z", "--config=c.py", "--workdir=gs://b/w",
          f"--accelerator={accelerator}", "--preemptible"]
  lines = _commands(_run(TPU, *args))
  _one(lines, "tpu-vm create", f"--accelerator-type={accelerator}", f"--version={runtime}",
       "--preemptible")
  lines = _commands(_run(TPU, *args, "--version=my-runtime"))
  _one(lines, "tpu-vm create", "--version=my-runtime")


def test_tpu_environment_variables_and_reuse():
  result = _run(TPU, "--config=c.py", "--workdir=gs://b/w", DRY_RUN="1", DRY_RUN_STATES="READY",
                TPU_NAME="envname", TPU_ZONE="europe-west4-b", TPU_ACCELERATOR_TYPE="v5litepod-16")
  lines = _commands(result)
  assert not any("tpu-vm create" in line for line in lines)
  assert "reusing envname" in result.stderr
  _one(lines, "tpu-vm ssh envname", "--zone=europe-west4-b", "--worker=all", "dense_ssl.main")


def test_tpu_git_clone_of_a_ref():
  lines = _commands(_run(TPU, "--dry-run", "--zone=z", "--config=c.py", "--workdir=gs://b/w",
                         "--repo=https://example.com/dense_ssl.git", "--ref=v1.2",
                         "--remote_dir=code"))
  clone = _one(lines, "--worker=all", "git clone")
  assert "https://example.com/dense_ssl.git code" in clone and "fetch -q origin v1.2" in clone
  assert not any("tar -czf" in line or "tpu-vm scp" in line for line in lines)
  _one(lines, "--worker=all", "cd code && bash launch/tpu_vm.sh worker-start")


def test_tpu_watch_requeues_after_preemption_and_exit_code_75():
  # Start on a READY VM. The first poll finds it PREEMPTED: delete, create, set up, start. The
  # next poll finds the trainer running, then exited with 75 (restart), then finished.
  result = _run(TPU, *TPU_ARGS[:-2], "--watch", "--poll=7", DRY_RUN_STATES="READY PREEMPTED READY",
                DRY_RUN_JOB_STATUS="running 75 0")
  lines = _commands(result)
  starts = [i for i, line in enumerate(lines) if "worker-start" in line]
  assert len(starts) == 3
  assert len([line for line in lines if line == "+ sleep 7"]) == 4
  delete = _one(lines, "tpu-vm delete ssl-v4", "--quiet")
  create = _one(lines, "tpu-vm create ssl-v4", "--spot")
  install = [i for i, line in enumerate(lines) if "[tpu,torch]" in line]
  assert starts[0] < lines.index(delete) < lines.index(create) < install[1] < starts[1]
  status = [line for line in lines if "--worker=0" in line and "cat dense_ssl/logs/status" in line]
  assert len(status) == 3
  assert "requeue 1" in result.stderr and "requeue 2" in result.stderr
  assert "finished (exit code 0)" in result.stderr


def test_tpu_watch_stops_on_failure_and_can_delete_when_done():
  failed = _run(TPU, *TPU_ARGS[:-2], "--watch", check=False, DRY_RUN_JOB_STATUS="1")
  assert failed.returncode == 1 and "failed with exit code 1" in failed.stderr
  done = _commands(_run(TPU, *TPU_ARGS[:-2], "--watch", "--delete_when_done"))
  assert done[-1].startswith("+ gcloud compute tpus tpu-vm delete ssl-v4")
  capped = _run(TPU, *TPU_ARGS[:-2], "--watch", "--max_restarts=2", check=False,
                DRY_RUN_JOB_STATUS="75")
  assert capped.returncode == 2 and "gave up after 2" in capped.stderr


def test_tpu_requires_a_gcs_workdir_and_a_zone():
  local = _run(TPU, "--dry-run", "--zone=z", "--config=c.py", "--workdir=/tmp/w", check=False)
  assert local.returncode == 2 and "gs://" in local.stderr
  nozone = _run(TPU, "--dry-run", "--config=c.py", "--workdir=gs://b/w", check=False)
  assert nozone.returncode == 2 and "--zone" in nozone.stderr


def test_tpu_stop_and_delete_actions():
  stop = _commands(_run(TPU, "--dry-run", "--zone=z", "--name=n", "--stop"))
  assert len(stop) == 1 and "--worker=all" in stop[0] and "worker-stop" in stop[0]
  delete = _commands(_run(TPU, "--dry-run", "--zone=z", "--name=n", "--delete"))
  assert delete == ["+ gcloud compute tpus tpu-vm delete n --zone=z --quiet"]


def _wait_for(predicate, timeout=20.0):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return True
    time.sleep(0.05)
  return False


def test_tpu_worker_side_start_status_and_stop(tmp_path):
  # What runs on each worker: a detached job with a per-worker log and an exit-code file.
  env = _env(TPU_WORKER_ID="3")

  def worker(*args):
    return subprocess.run(["bash", str(TPU), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60, check=True)

  worker("worker-start", "--", "bash", "-c", "echo hello from $0; exit 75", "w3")
  status = tmp_path / "logs" / "status"
  assert _wait_for(lambda: status.read_text().strip() == "75")
  assert "hello from w3" in (tmp_path / "logs" / "worker-3.log").read_text()

  trainer = ("sleep 60 & trap 'kill $!; echo saving; exit 75' TERM; echo started; wait; "
             "echo not-stopped")
  out = worker("worker-start", "--", "bash", "-c", trainer).stdout
  assert "worker 3: started" in out
  log = tmp_path / "logs" / "worker-3.log"
  assert _wait_for(lambda: log.read_text().count("started") == 1)
  assert status.read_text().strip() == "running"
  worker("worker-stop")
  assert "saving" in log.read_text() and "not-stopped" not in log.read_text()
  assert not (tmp_path / "logs" / "pid").exists()


# ------------------------------------------------------------------------------------------------
# GPU node

GPU_ARGS = ["--dry-run", "--config=configs/densecl.py", "--workdir=/runs/densecl",
            "--data_dir=/data/tfds", "--gpus=0,1,2,3", "--", "--config.batch_size=512"]


def test_gpu_dry_run():
  lines = _commands(_run(GPU, *GPU_ARGS))
  _one(lines, "export CUDA_VISIBLE_DEVICES=0,1,2,3")
  _one(lines, "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.90")
  train = _one(lines, "-m dense_ssl.main")
  for piece in ("--config=configs/densecl.py", "--workdir=/runs/densecl",
                "--config.data.data_dir=/data/tfds", "--config.batch_size=512"):
    assert piece in train
  assert lines[-1] == train  # the environment comes first
  half = _commands(_run(GPU, "--mem_fraction=0.5", *GPU_ARGS))
  _one(half, "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.5")


def test_gpu_dry_run_reruns_on_75_and_installs_cuda_jax():
  result = _run(GPU, *GPU_ARGS[:-2], "--install", DRY_RUN_EXIT_CODES="75 75 0")
  lines = _commands(result)
  install = [line for line in lines if "pip install" in line]
  assert install == ["+ .venv/bin/pip install -q -c requirements.lock -e '.[cuda12,torch]' "
                     "--extra-index-url https://download.pytorch.org/whl/cpu"]
  assert lines.index(install[0]) <= 1  # after the venv, if .venv is not there yet
  cuda13 = _commands(_run(GPU, *GPU_ARGS[:-2], "--install", "--cuda=cuda13"))
  _one(cuda13, "pip install", "-e '.[cuda13,torch]'")
  runs = [line for line in lines if "-m dense_ssl.main" in line]
  assert len(runs) == 3 and runs[0].startswith("+ .venv/bin/python -m dense_ssl.main")
  assert "restart 2 of at most 20" in result.stderr
  failed = _run(GPU, *GPU_ARGS, check=False, DRY_RUN_EXIT_CODES="75 3")
  assert failed.returncode == 3 and len(_commands(failed)) == 6


FAKE_TRAINER = """#!/usr/bin/env bash
# A stand-in for `python -m dense_ssl.main`: counts its runs and exits with the code listed
# for this run; with FAKE_SLEEP it waits and turns SIGTERM into exit code 75.
n=$(( $(cat "$FAKE_DIR/runs" 2>/dev/null || echo 0) + 1 )); echo $n > "$FAKE_DIR/runs"
echo "$PWD $* $XLA_PYTHON_CLIENT_MEM_FRACTION" > "$FAKE_DIR/args"
if [[ -n "${FAKE_SLEEP:-}" ]]; then
  sleep "$FAKE_SLEEP" &
  trap 'kill $!; echo term > "$FAKE_DIR/term"; exit 75' TERM
  wait
fi
codes=(${FAKE_CODES:-0}); exit "${codes[$((n - 1))]:-0}"
"""


def _fake(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text)
  path.chmod(0o755)
  return path


def test_gpu_reruns_the_trainer_after_75(tmp_path):
  fake = _fake(tmp_path, "fake_python", FAKE_TRAINER)
  result = subprocess.run(
      ["bash", str(GPU), f"--python={fake}", "--config=configs/mocov2.py", "--workdir=rel/w"],
      cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
      env=_env(FAKE_DIR=str(tmp_path), FAKE_CODES="75 75 0"))
  assert result.returncode == 0, result.stderr
  assert (tmp_path / "runs").read_text().strip() == "3"
  cwd, *args, fraction = (tmp_path / "args").read_text().split()
  assert cwd == str(ROOT) and fraction == "0.90"
  assert args == ["-m", "dense_ssl.main", "--config=configs/mocov2.py", f"--workdir={tmp_path}/rel/w"]


def test_gpu_passes_sigterm_on_and_does_not_restart(tmp_path):
  fake = _fake(tmp_path, "fake_python", FAKE_TRAINER)
  proc = subprocess.Popen(
      ["bash", str(GPU), f"--python={fake}", "--config=c.py", "--workdir=/w"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=_env(FAKE_DIR=str(tmp_path), FAKE_SLEEP="60"))
  try:
    assert _wait_for((tmp_path / "args").exists)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
  finally:
    proc.kill()
  assert proc.returncode == 75, err
  assert (tmp_path / "term").exists() and (tmp_path / "runs").read_text().strip() == "1"


# ------------------------------------------------------------------------------------------------
# SLURM

SLURM_ARGS = ["--dry-run", "--config=configs/densecl.py", "--workdir=/shared/runs/densecl",
              "--data_dir=/shared/tfds", "--", "--config.batch_size=1024"]


def test_slurm_directives():
  text = SLURM.read_text()
  header = text[:text.index("set -euo pipefail")]
  for directive in ("--ntasks-per-node=1", "--requeue", "--signal=B:TERM@120",
                    "--open-mode=append", "--gpus-per-node="):
    assert f"#SBATCH {directive}" in header
  assert "trap 'forward_term' TERM" in text and 'scontrol requeue "$JOB_ID"' in text
  assert 'scancel --signal=TERM "$JOB_ID"' in text
  # Every #SBATCH line must precede the first command, or sbatch ignores it.
  first_command = min(i for i, line in enumerate(text.splitlines())
                      if line and not line.startswith("#"))
  assert all(i < first_command for i, line in enumerate(text.splitlines())
             if line.startswith("#SBATCH"))


def test_slurm_dry_run():
  lines = _commands(_run(SLURM, *SLURM_ARGS, SLURM_JOB_ID="4242", SLURM_GPUS_ON_NODE="8"))
  assert lines[0] == f"+ cd {ROOT}"
  _one(lines, "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7")
  _one(lines, "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.90")
  srun = _one(lines, "srun")
  assert srun.startswith(f"+ srun --ntasks-per-node=1 {ROOT}/.venv/bin/python -m dense_ssl.main")
  for piece in ("--config=configs/densecl.py", "--workdir=/shared/runs/densecl",
                "--config.data.data_dir=/shared/tfds", "--config.batch_size=1024"):
    assert piece in srun
  assert lines[-1] == srun and not any("scontrol" in line for line in lines)


def test_slurm_dry_run_requeues_on_75():
  result = _run(SLURM, *SLURM_ARGS, SLURM_JOB_ID="4242", DRY_RUN_EXIT_CODE="75")
  lines = _commands(result)
  assert lines[-1] == "+ scontrol requeue 4242"
  assert lines[-2].startswith("+ srun ")
  failed = _run(SLURM, *SLURM_ARGS, check=False, SLURM_JOB_ID="1", DRY_RUN_EXIT_CODE="3")
  assert failed.returncode == 3 and "scontrol" not in failed.stdout
  capped = _run(SLURM, "--max_requeues=5", *SLURM_ARGS, check=False, SLURM_JOB_ID="1",
                SLURM_RESTART_COUNT="5", DRY_RUN_EXIT_CODE="75")
  assert capped.returncode == 75 and "scontrol" not in capped.stdout


FAKE_SRUN = """#!/usr/bin/env bash
echo "$*" > "$FAKE_DIR/srun_args"
echo "$JAX_LOCAL_DEVICE_IDS" > "$FAKE_DIR/device_ids"
sleep 60 &
trap 'kill $!; echo term > "$FAKE_DIR/term"; exit 75' TERM
wait
"""


def test_slurm_sigterm_saves_and_requeues(tmp_path):
  # --signal=B:TERM@120 signals the batch shell; it forwards the signal to srun, and the tasks
  # exit with 75. Then the job requeues itself.
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _fake(bin_dir, "srun", FAKE_SRUN)
  _fake(bin_dir, "scontrol", '#!/usr/bin/env bash\necho "$*" >> "$FAKE_DIR/scontrol"\n')
  # scancel fails here (as outside a real job), so the script falls back to signalling srun.
  _fake(bin_dir, "scancel", '#!/usr/bin/env bash\necho "$*" >> "$FAKE_DIR/scancel"; exit 1\n')
  env = _env(FAKE_DIR=str(tmp_path), PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="987",
             SLURM_SUBMIT_DIR=str(ROOT), SLURM_NTASKS_PER_NODE="1", SLURM_GPUS_ON_NODE="4")
  proc = subprocess.Popen(["bash", str(SLURM), "--config=configs/densecl.py", "--workdir=/w"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
  try:
    assert _wait_for((tmp_path / "srun_args").exists)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
  finally:
    proc.kill()
  assert proc.returncode == 0, err
  assert (tmp_path / "term").exists()
  assert (tmp_path / "scancel").read_text().split() == ["--signal=TERM", "987"]
  assert (tmp_path / "scontrol").read_text().split() == ["requeue", "987"]
  assert (tmp_path / "device_ids").read_text().strip() == "0,1,2,3"
  assert "--ntasks-per-node=1" in (tmp_path / "srun_args").read_text()
