"""The evaluator interface and registry, big_vision style.

An evaluator is built from `config.evals.<name>` (a dict: `type` names the registered class,
defaulting to `<name>`; every other key is a constructor argument) plus the method's backbone
(`Method.backbone`, a `dense_ssl.models.Backbone`), and `run(variables)` on the backbone's
variables (`Method.backbone_variables`) yields `(key, value)` pairs; `run_all` prefixes them
`<name>/<key>`.
Configs are duck-typed (a dict, or anything with `items()`), so this package runs without
ml_collections.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterator, Mapping, Protocol

from dense_ssl import registry


# `config.evals` of a run whose config sets none: every evaluator with its defaults (the
# fmnist-scene protocol of benchmarks/reproduce.py).
DEFAULT_EVALS: dict[str, dict[str, Any]] = {
    "linear": {"type": "linear"},
    "knn": {"type": "knn"},
    "dense": {"type": "dense"},
    "corr": {"type": "correspondence"},
}


class Evaluator(Protocol):
  """What an evaluator offers: `run` on the backbone's {"params", "batch_stats"}."""

  def run(self, variables: Any) -> Iterator[tuple[str, float]]:
    ...


_REGISTRY: registry.Registry[Callable[..., Evaluator]] = registry.Registry(
    "evaluator type", "the `type` of a config.evals entry")
# Class decorator: makes an evaluator constructible as `type: name`.
register = _REGISTRY.register
names = _REGISTRY.names


def create(type_name: str, backbone: Any, **params: Any) -> Evaluator:
  """Builds the evaluator registered as `type_name` for `backbone` (a `models.Backbone`)."""
  cls = _REGISTRY.get(type_name)
  valid = [p for p in inspect.signature(cls).parameters if p != "backbone"]
  unknown = sorted(set(params) - set(valid))
  if unknown:
    raise ValueError(f"Evaluator {type_name!r} has no parameter(s) {', '.join(unknown)}; valid: "
                     f"{', '.join(valid)}.")
  return cls(backbone, **params)


def _as_dict(node: Any) -> dict[str, Any]:
  return node.to_dict() if hasattr(node, "to_dict") else dict(node)


def from_config(evals: Mapping[str, Any], backbone: Any,
                only: list[str] | None = None) -> dict[str, Evaluator]:
  """{name: evaluator} from `config.evals` (name -> {"type": ..., params}), in config order.

  `only` keeps the named evaluators (e.g. from `--evals=linear,knn`); a name missing from the
  config is an error that lists the configured ones.
  """
  evals = _as_dict(evals)
  if only is not None:
    missing = [n for n in only if n not in evals]
    if missing:
      raise ValueError(f"No evaluator named {', '.join(missing)} in config.evals; configured: "
                       f"{', '.join(evals)}.")
    evals = {n: evals[n] for n in only}
  out = {}
  for name, cfg in evals.items():
    params = _as_dict(cfg)
    out[name] = create(params.pop("type", name), backbone, **params)
  return out


def run_all(evaluators: Mapping[str, Evaluator], variables: Any) -> dict[str, float]:
  """Runs every evaluator on the backbone's variables; returns {"<name>/<key>": value}."""
  results = {}
  for name, evaluator in evaluators.items():
    for key, value in evaluator.run(variables):
      results[f"{name}/{key}"] = float(value)
  return results
