"""Evaluates a checkpoint: python -m dense_ssl.evaluate --workdir=W [--step=N] [--evals=a,b].

Loads the run's config.json and its checkpoint (the online backbone and its BatchNorm running
statistics), builds the evaluators of `config.evals` (or `evaluate.DEFAULT_EVALS` for runs whose
config has none), prints a table and writes `<workdir>/eval_<step>.json` (see runner.py).
"""

from __future__ import annotations

import sys

from absl import app, flags

from dense_ssl.evaluate import runner

_WORKDIR = flags.DEFINE_string("workdir", None, "The --workdir of a dense_ssl training run.",
                               required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_EVALS = flags.DEFINE_list("evals", None, "Evaluators to run, by their config.evals name "
                           "(default: all).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  try:
    step, results = runner.evaluate_checkpoint(_WORKDIR.value, _STEP.value, _EVALS.value)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"{_WORKDIR.value} step {step}\n{runner.format_table(results)}")
  print(f"wrote {runner.write_results(_WORKDIR.value, step, results)}")


if __name__ == "__main__":
  app.run(main)
