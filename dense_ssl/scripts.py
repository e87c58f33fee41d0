"""The console scripts of pyproject.toml's [project.scripts]: each runs its module as `python -m`.

`dense-ssl-train ARGS` is `python -m dense_ssl.main ARGS`, with the same --help (absl reads the
flags and the docstring of `__main__`), exit codes and one-line errors.
"""

import runpy


def _run(module: str) -> None:
  runpy.run_module(module, run_name="__main__", alter_sys=True)


def train() -> None:
  _run("dense_ssl.main")


def evaluate() -> None:
  _run("dense_ssl.evaluate")


def export() -> None:
  _run("dense_ssl.export")


def parity() -> None:
  _run("dense_ssl.parity")


def visualize() -> None:
  _run("dense_ssl.visualize_matches")
