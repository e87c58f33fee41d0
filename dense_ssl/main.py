"""Entrypoint: python -m dense_ssl.main --config=configs/<method>.py[:variant] --workdir=DIR.

Override any config value on the command line, e.g. `--config.optim.lr=0.1`; a misspelt key is
an error. Running the same command again resumes from the newest checkpoint in --workdir.
"""

import logging as logging_std
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with a variant: configs/densecl.py:demo.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (or gs:// path) for checkpoints and "
                               "logs; an existing one is resumed.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for "
                                   "multi-process runs outside Cloud TPU/SLURM (auto-detected).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Process count (with "
                                      "--coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with "
                                   "--coordinator_address).")
flags.mark_flags_as_required(["config", "workdir"])


def _multi_process_environment() -> bool:
  """True on a multi-host Cloud TPU slice or inside a multi-task SLURM job."""
  tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in tpu_hosts or int(os.environ.get("SLURM_NTASKS", "1")) > 1


class _QuietLibraries(logging_std.Filter):
  """Drops orbax's per-save INFO chatter (dozens of lines per checkpoint) from the console."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or "/orbax/" not in record.pathname


def main(argv):
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  # TensorFlow only feeds data: keep it off the accelerators (and their memory).
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import jax  # pylint: disable=g-import-not-at-top
  if _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _multi_process_environment():
    jax.distributed.initialize()
  from dense_ssl import train  # pylint: disable=g-import-not-at-top
  logging.info("JAX %s on %s; process %d of %d.", jax.__version__, jax.devices()[0].platform,
               jax.process_index(), jax.process_count())
  try:
    train.run(_CONFIG.value, _WORKDIR.value)
  except (ValueError, train.NonFiniteError, FileNotFoundError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def _parse_flags(argv):
  from dense_ssl import config_errors  # pylint: disable=g-import-not-at-top
  argv = config_errors.resolve_argv(argv)  # outside a checkout: the installed configs/
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as e:
    try:
      message = config_errors.explain(argv) or e
    except Exception as load_error:  # pylint: disable=broad-except  (the config file itself)
      message = load_error
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
