"""Test set-up: 8 fake CPU devices, so sharded code paths run on any machine; one persistent
compilation cache per test session.

Many tests train the same `test` variant (in this process and in `dense_ssl.main`
subprocesses, which inherit the environment), so a session-wide cache compiles each step once.
XLA keys entries on the whole program and its options, so a hit is the same executable a fresh
compile would give, and a test can never see another run's stale entry: the directory is new
for every session (pytest-xdist workers share the controller's) and removed at its end.
"""

import os
import shutil
import tempfile

# Must be set before jax is imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dense_ssl_test_jax_cache_")
# Below ~0.5 s, writing an entry costs about what it saves.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE:  # xdist workers inherit the controller's directory and leave it alone
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# The modules that take minutes (measured with --durations): collected first, so that with
# `-n 2 --dist loadfile` (README) no long module is left to start near the end.
_SLOW_MODULES = ("test_train.py", "test_multiprocess.py", "test_benchmarks.py",
                 "test_config_fuzz.py", "test_evaluate.py", "test_reproduce.py")


def pytest_collection_modifyitems(config, items):
  del config

  def rank(item):
    name = os.path.basename(str(item.path))
    return _SLOW_MODULES.index(name) if name in _SLOW_MODULES else len(_SLOW_MODULES)

  items.sort(key=rank)  # stable: the order within a module is kept
