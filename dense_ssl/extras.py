"""Optional dependencies: a missing one is one line naming the extra that installs it.

    torch = extras.require("torch", "Writing model.pth")
    # ModuleNotFoundError: Writing model.pth needs PyTorch: pip install "dense_ssl[torch]"

`require` imports and returns the module, or raises `MissingExtra` (a ModuleNotFoundError, so
`except ImportError` still catches it). A program that does not catch it prints that line as
`error: ...` on stderr and exits with 1, not a traceback: `require` installs a `sys.excepthook`
for this one exception type (every other exception keeps the previous hook). The extras are
defined in pyproject.toml ([project.optional-dependencies]); README.md lists them.
"""

from __future__ import annotations

import importlib
import sys
import types

# Import name -> (distribution to name in the message, extra that installs it).
PACKAGES = {
    "torch": ("PyTorch", "torch"),
    "skimage": ("scikit-image", "demo"),
    "matplotlib": ("matplotlib", "viz"),
    "cv2": ("OpenCV contrib (selective search)", "proposals"),
}


class MissingExtra(ModuleNotFoundError):
  """An optional dependency is not installed; the message says which extra to install."""


def message(module: str, what: str, extra: str | None = None) -> str:
  """'<what> needs <package>: pip install "dense_ssl[<extra>]"'."""
  top = module.split(".")[0]
  package, default_extra = PACKAGES.get(top, (top, None))
  extra = extra or default_extra
  if extra is None:
    raise ValueError(f"No extra installs {top!r}; add it to dense_ssl.extras.PACKAGES.")
  return f'{what} needs {package}: pip install "dense_ssl[{extra}]"'


def require(module: str, what: str, extra: str | None = None) -> types.ModuleType:
  """`importlib.import_module(module)`, or MissingExtra naming the extra if it is not installed.

  Args:
    module: import name, e.g. "torch" or "skimage.data".
    what: what needs it, the start of the message ("Writing x.pth", "The demo photos").
    extra: the extra to install; by default the one `PACKAGES` gives for the top-level module.
  """
  try:
    return importlib.import_module(module)
  except ModuleNotFoundError as error:
    # Only the module itself (or a parent package) missing; a broken install keeps its error.
    if error.name is None or not (module == error.name or module.startswith(error.name + ".")):
      raise
    _install_excepthook()
    raise MissingExtra(message(module, what, extra), name=error.name) from None


def _install_excepthook() -> None:
  if getattr(sys.excepthook, "_dense_ssl_extras", False):
    return
  previous = sys.excepthook

  def hook(kind, value, traceback):
    if isinstance(value, MissingExtra):
      print(f"error: {value}", file=sys.stderr)
    else:
      previous(kind, value, traceback)

  hook._dense_ssl_extras = True  # pylint: disable=protected-access
  sys.excepthook = hook
