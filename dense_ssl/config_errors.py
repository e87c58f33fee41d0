"""Turns a failed `--config.<key>=value` override into one line naming the key and the choices.

ml_collections raises a bare `AttributeError: "'foo'"` from deep inside flag parsing; users need
to know which override was wrong and what the valid keys at that level are.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any


def resolve(spec: str) -> str:
  """`spec`, or the installed copy of a `configs/<file>.py[:arg]` that is not here.

  pip installs configs/ as dense_ssl/configs, so `--config=configs/densecl.py:demo` also works
  outside a checkout; `configs` is then that copy (the files' own `from configs import common`).
  """
  path, sep, arg = spec.partition(":")
  relative = os.path.normpath(path)
  if os.path.exists(path) or not relative.startswith("configs" + os.sep):
    return spec
  package = importlib.util.find_spec("dense_ssl.configs")
  if package is None or not package.submodule_search_locations:
    return spec
  installed = os.path.join(list(package.submodule_search_locations)[0], relative[len("configs/"):])
  if not os.path.exists(installed):
    return spec
  sys.modules.setdefault("configs", importlib.import_module("dense_ssl.configs"))
  return installed + sep + arg


def resolve_argv(argv: list[str]) -> list[str]:
  """argv with its `--config=` resolved (`resolve`)."""
  return [f"--config={resolve(a[len('--config='):])}" if a.startswith("--config=") else a
          for a in argv]


def load_config(spec: str) -> Any:
  """Loads `path.py[:arg]` the way ml_collections.config_flags does."""
  path, _, arg = resolve(spec).partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"--config={spec}: no such file {path!r}; configs live in configs/.")
  module_spec = importlib.util.spec_from_file_location("_dense_ssl_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def override(config: Any, overrides: dict[str, Any]) -> Any:
  """`config` with dotted keys set ({"optim.lr": 0.1}), as `--config.optim.lr=0.1` would; locked."""
  config.unlock()
  for key, value in overrides.items():
    *path, last = key.split(".")
    node = config
    for name in path:
      node = node[name]
    node[last] = value
  config.lock()
  return config


def explain(argv: list[str]) -> str | None:
  """The first bad `--config.` override in argv, explained; None if all keys exist."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None:
    return None
  config = load_config(spec)
  for arg in argv:
    if not arg.startswith("--config.") or "=" not in arg:
      continue
    path = arg[len("--config."):].split("=", 1)[0]
    node, walked = config, []
    for key in path.split("."):
      keys = list(node.keys()) if hasattr(node, "keys") else []
      if key not in keys:
        where = "config" + "".join(f".{k}" for k in walked)
        return (f"--config.{path}: {where} has no key {key!r}; valid keys: "
                f"{', '.join(sorted(keys)) or '(none: it is a value, not a group)'}.")
      node, walked = node[key], walked + [key]
  return None
