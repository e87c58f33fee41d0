"""pyproject.toml, requirements.lock and the optional-dependency messages agree with the code.

* Every third-party module dense_ssl imports is a dependency or, if optional, in an extra that
  dense_ssl.extras names; `test` holds every runtime extra; setuptools ships every package.
* The lock pins every dependency at a version the lower bounds admit, torch as its CPU build.
* tests/jax_only.txt lists modules that import no TensorFlow, tfds, ml_collections or clu.
* A missing extra is one line naming it, in library code (MissingExtra) and in programs.
"""

import ast
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from dense_ssl import config_errors, extras

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPROJECT = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))
PROJECT = PYPROJECT["project"]
EXTRAS = PROJECT["optional-dependencies"]
NOT_ON_JAX_ONLY = ("tensorflow", "tensorflow_datasets", "ml_collections", "clu")


def _names(requirements):
  return {canonicalize_name(Requirement(r).name) for r in requirements}


def _imports(path):
  """Top-level names of the absolute imports in a file."""
  tree = ast.parse(open(path).read())
  names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
           for a in n.names}
  names |= {n.module.split(".")[0] for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and n.module and not n.level}
  return names


def _package_files():
  for directory, _, files in os.walk(os.path.join(ROOT, "dense_ssl")):
    yield from (os.path.join(directory, f) for f in files if f.endswith(".py"))


def test_every_import_is_a_dependency_or_in_an_extra():
  distributions = importlib.metadata.packages_distributions()
  core = _names(PROJECT["dependencies"])
  optional = {name for name, _ in extras.PACKAGES.items()}
  for path in _package_files():
    for name in _imports(path) - set(sys.stdlib_module_names) - {"dense_ssl", "configs"}:
      if name in optional:
        _, extra = extras.PACKAGES[name]
        dists = {canonicalize_name(d) for d in distributions.get(name, [name])}
        assert dists & _names(EXTRAS[extra]), (path, name, extra)
        continue
      assert name in distributions, f"{path} imports {name}, which is not installed"
      dists = {canonicalize_name(d) for d in distributions[name]}
      assert dists & core, f"{path} imports {name} ({dists}): add it to [project].dependencies"


def test_optional_imports_go_through_extras_require():
  """A module that imports torch, scikit-image or matplotlib asks extras.require for it."""
  for path in _package_files():
    text = open(path).read()
    for name in _imports(path) & set(extras.PACKAGES):
      assert re.search(rf'extras\.require\(\s*"{name}[".]', text), (
          f"{path} imports {name} without dense_ssl.extras.require (one line naming the extra)")


def test_test_extra_installs_every_runtime_extra():
  runtime = set().union(*(_names(EXTRAS[e]) for e in ("demo", "viz", "torch", "proposals")))
  assert runtime <= _names(EXTRAS["test"])
  for extra in ("demo", "viz", "torch", "proposals"):
    for requirement in EXTRAS[extra]:  # the same lower bound in both places
      assert requirement in EXTRAS["test"], requirement
  assert {e for _, e in extras.PACKAGES.values()} <= set(EXTRAS)


def test_setuptools_ships_every_package_and_the_configs():
  packages = set(PYPROJECT["tool"]["setuptools"]["packages"])
  found = {os.path.relpath(d, ROOT).replace(os.sep, ".")
           for d, _, files in os.walk(os.path.join(ROOT, "dense_ssl")) if "__init__.py" in files}
  assert packages == found | {"dense_ssl.configs"}
  assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"dense_ssl.configs": "configs"}


def test_console_scripts_are_the_python_m_modules():
  from dense_ssl import scripts  # pylint: disable=g-import-not-at-top
  for name, target in PROJECT["scripts"].items():
    module, function = target.split(":")
    assert module == "dense_ssl.scripts" and callable(getattr(scripts, function)), name
  for module in ("dense_ssl.main", "dense_ssl.evaluate.__main__", "dense_ssl.export",
                 "dense_ssl.parity", "dense_ssl.visualize_matches"):
    assert importlib.util.find_spec(module) is not None
  script = os.path.join(os.path.dirname(sys.executable), "dense-ssl-train")
  if not os.path.exists(script):
    pytest.skip("dense_ssl is not installed in this environment (pip install -e .)")
  result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120,
                          check=False)
  # absl's --help (exit code 1): the module's docstring and its flags, as python -m prints them.
  assert result.stdout.startswith("Entrypoint: python -m dense_ssl.main"), result.stdout[:500]
  assert "--workdir" in result.stdout and "--config" in result.stdout


def _lock():
  text = open(os.path.join(ROOT, "requirements.lock")).read()
  pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", text, re.M))
  return text, {canonicalize_name(k): Version(v) for k, v in pins.items()}


def test_lock_pins_every_dependency_within_its_bounds():
  text, pins = _lock()
  assert "bash .ci/lock" in text.split("\n\n")[0]  # pip-compile's header: how to regenerate
  assert not re.search(r"^(-e|--|\S+ @ )", text, re.M), "the lock must work as a constraints file"
  for spec in PROJECT["dependencies"] + EXTRAS["test"]:
    requirement = Requirement(spec)
    if requirement.marker and not requirement.marker.evaluate():
      continue
    name = canonicalize_name(requirement.name)
    assert name in pins, f"{name} is not in requirements.lock: bash .ci/lock"
    assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name])
  # The lower bounds are what CI tests: the lock's versions (the newest jax runs separately).
  for spec in PROJECT["dependencies"]:
    requirement = Requirement(spec)
    if requirement.marker and not requirement.marker.evaluate():
      continue
    (bound,) = [s for s in requirement.specifier if s.operator == ">="]
    assert Version(bound.version) == pins[canonicalize_name(requirement.name)], spec
  assert pins["torch"].local == "cpu"  # the CPU build, never a CUDA one


def test_jax_only_modules_import_no_tensorflow_tfds_ml_collections_or_clu():
  """Imported in a fresh interpreter where those packages cannot be imported at all."""
  modules = [line.strip() for line in open(os.path.join(ROOT, "tests", "jax_only.txt"))
             if line.startswith("tests/")]
  assert "tests/test_step.py" in modules
  code = "\n".join([
      "import importlib.util, sys",
      f"sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, 'tests')!r}]",
      f"for name in {NOT_ON_JAX_ONLY!r}: sys.modules[name] = None",
      f"for path in {modules!r}:",
      f"  spec = importlib.util.spec_from_file_location(path[6:-3], {ROOT!r} + '/' + path)",
      "  spec.loader.exec_module(importlib.util.module_from_spec(spec))",
  ])
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]


def test_missing_extra_is_one_line_naming_it(monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)
  from dense_ssl import export  # pylint: disable=g-import-not-at-top
  with pytest.raises(ImportError, match=r'^Writing x\.pth needs PyTorch: pip install '
                     r'"dense_ssl\[torch\]"$') as info:
    export.save({}, "x.pth")
  assert isinstance(info.value, extras.MissingExtra) and info.value.name == "torch"
  # Both names: a test that ran earlier in this process may have imported skimage.data.
  monkeypatch.setitem(sys.modules, "skimage", None)
  monkeypatch.setitem(sys.modules, "skimage.data", None)
  with pytest.raises(extras.MissingExtra, match=r'needs scikit-image: pip install '
                     r'"dense_ssl\[demo\]"'):
    extras.require("skimage.data", "The demo")


def test_a_broken_install_keeps_its_own_error(tmp_path, monkeypatch):
  """Only the optional package itself missing is a MissingExtra; what it fails to import is not."""
  (tmp_path / "matplotlib").mkdir()
  (tmp_path / "matplotlib" / "__init__.py").write_text("import not_a_module_xyz\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.delitem(sys.modules, "matplotlib", raising=False)
  with pytest.raises(ModuleNotFoundError) as info:
    extras.require("matplotlib", "Drawing")
  assert not isinstance(info.value, extras.MissingExtra) and info.value.name == "not_a_module_xyz"
  monkeypatch.delitem(sys.modules, "matplotlib", raising=False)


def test_a_program_prints_one_line_and_exits_1():
  code = ("import runpy, sys; sys.modules['matplotlib'] = None; sys.argv[1:] = ['--workdir=w']; "
          "runpy.run_module('dense_ssl.visualize_matches', run_name='__main__')")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, check=False)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      'error: Drawing the matches (dense_ssl.visualize_matches) needs matplotlib: '
      'pip install "dense_ssl[viz]"')
  assert "Traceback" not in result.stderr


def test_configs_outside_a_checkout_are_the_installed_ones(tmp_path, monkeypatch):
  if importlib.util.find_spec("dense_ssl.configs") is None:
    pytest.skip("dense_ssl is not installed (pip install -e .)")
  monkeypatch.chdir(tmp_path)
  spec = config_errors.resolve("configs/densecl.py:test")
  assert spec.endswith(os.path.join("configs", "densecl.py") + ":test") and os.path.isabs(spec)
  config = config_errors.load_config("configs/densecl.py:test")
  assert config.method.name == "densecl" and config.batch_size == 16
  assert config_errors.resolve("configs/nope.py") == "configs/nope.py"  # the usual error then
  assert config_errors.resolve("my/densecl.py:demo") == "my/densecl.py:demo"


def test_readme_names_every_extra():
  readme = open(os.path.join(ROOT, "README.md")).read()
  section = readme[readme.index("## Install"):]
  section = section[:section.index("\n## ", 1)]
  for extra in EXTRAS:
    assert f"`{extra}`" in section, extra
  assert "bash .ci/lock" in section and "requirements.lock" in section
