"""Levels import downwards only: kernels < models < methods < tools < the trainer.

Read from every module's top-level imports (imports inside functions are plug-in look-ups, such
as the parity runner loading the methods that register their checkers).
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).parents[1] / "dense_ssl"

# Lowest first. A module may import modules of its own level or below.
LEVELS = (
    # Pure kernels and small utilities: no model, method, data pipeline or tool.
    ("dense_ssl.losses", "dense_ssl.matchers", "dense_ssl.queues", "dense_ssl.ema",
     "dense_ssl.registry", "dense_ssl.config_errors", "dense_ssl.xla_cpu", "dense_ssl.optim",
     "dense_ssl.state", "dense_ssl.sharding", "dense_ssl.parity", "dense_ssl.data.spec",
     "dense_ssl.data.augment", "dense_ssl.data.scenes", "dense_ssl.extras"),
    ("dense_ssl.models",),
    ("dense_ssl.methods",),
    ("dense_ssl.data",),  # the host pipeline: views, sources, pipeline
    ("dense_ssl.evaluate", "dense_ssl.checkpoint", "dense_ssl.export",
     "dense_ssl.visualize_matches"),
    ("dense_ssl.train", "dense_ssl.main", "dense_ssl.scripts"),
)


def _level(module: str) -> int:
  best = None
  for level, prefixes in enumerate(LEVELS):
    for prefix in prefixes:
      if module == prefix or module.startswith(prefix + "."):
        if best is None or len(prefix) > best[1]:
          best = (level, len(prefix))
  assert best is not None, f"{module} has no level in tests/test_layout.py"
  return best[0]


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: pathlib.Path) -> set[str]:
  found = set()
  for node in ast.parse(path.read_text()).body:
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      # "from a.b import c" is a.b.c when c is a module, else a name in a.b: the longest
      # level prefix of a.b.c decides either way.
      found |= {f"{node.module}.{a.name}" for a in node.names}
  return {m for m in found if m.startswith("dense_ssl.")}


def test_every_module_imports_only_its_level_or_below():
  violations = []
  for path in sorted(PACKAGE.rglob("*.py")):
    module = _module_name(path)
    if module == "dense_ssl":
      continue
    own = _level(module)
    for imported in _top_level_imports(path):
      if _level(imported) > own:
        violations.append(f"{module} (level {own}) imports {imported} "
                          f"(level {_level(imported)})")
  assert not violations, "\n".join(violations)


def test_the_kernels_import_nothing_of_dense_ssl():
  for name in ("losses", "matchers"):
    imports = _top_level_imports(PACKAGE / f"{name}.py")
    assert imports == set(), (name, imports)
