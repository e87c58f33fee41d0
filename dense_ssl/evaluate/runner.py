"""Evaluating a training run's checkpoint: the logic behind `python -m dense_ssl.evaluate`."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

from dense_ssl import checkpoint
from dense_ssl.evaluate import base


def run_timed(evaluators: Mapping[str, base.Evaluator], variables: Any) -> dict[str, float]:
  """`base.run_all`, plus each evaluator's wall time as `z/secs/<name>`."""
  results = {}
  for name, evaluator in evaluators.items():
    start = time.perf_counter()
    results.update(base.run_all({name: evaluator}, variables))
    results[f"z/secs/{name}"] = time.perf_counter() - start
  return results


def evaluate_checkpoint(workdir: str, step: int | None = None,
                        only: list[str] | None = None) -> tuple[int, dict[str, float]]:
  """Runs a run's evaluators on its checkpoint; returns (step, {"<name>/<key>": value}).

  The evaluators are the run's `config.evals` (from its config.json), or `DEFAULT_EVALS` when
  it has none; `only` keeps the named ones. Each also reports its time as `z/secs/<name>`.
  """
  config = checkpoint.load_config_dict(workdir)
  step, backbone, variables = checkpoint.load_backbone(workdir, step)
  evaluators = base.from_config(config.get("evals") or base.DEFAULT_EVALS, backbone, only)
  return step, run_timed(evaluators, variables)


def format_table(results: dict[str, float]) -> str:
  """A two-column text table, one metric per row."""
  width = max(len(k) for k in results)
  return "\n".join(f"{k:<{width}}  {v:.4f}" for k, v in results.items())


def write_results(workdir: str, step: int, results: dict[str, float]) -> str:
  """Writes `<workdir>/eval_<step>.json` ({"step", metrics...}); returns its path."""
  path = os.path.join(workdir, f"eval_{step}.json")
  with open(path, "w") as f:
    json.dump({"step": step, **results}, f, indent=2)
  return path
