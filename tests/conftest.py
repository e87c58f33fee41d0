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

import pytest

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


@pytest.fixture(scope="session")
def tiny_method():
  """A function building a tiny method and its first loss and gradients, for unit tests.

  `tiny_method(config, batch_size, size=None, key=..., extra=None)` creates the method of
  `config`, fills each of its views with normal noise of `batch_size` images of `size` px (the
  view's own size when None) plus the `extra` batch entries, initialises it, and returns
  dict(method, variables, batch, loss_and_grads, loss, out, grads, target_grads), where
  `loss_and_grads(params, target_params, batch)` is the jitted value-and-gradient of the
  method's loss (w.r.t. both parameter sets) that produced the rest.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  from dense_ssl import methods

  def build(config, batch_size, size=None, key=None, extra=None):
    method = methods.create(config)
    rng = np.random.default_rng(0)
    batch = {v.name: jnp.asarray(rng.normal(size=(batch_size, size or v.size, size or v.size, 3)),
                                 jnp.float32) for v in method.views()}
    batch.update(extra or {})
    key = jax.random.key(0, impl="rbg") if key is None else key
    variables = jax.jit(method.init)(key, batch)
    state = methods.MethodState(step=jnp.zeros((), jnp.int32),
                                target_params=variables["target_params"],
                                batch_stats=variables["batch_stats"], extra=variables["extra"])

    def loss_fn(params, target, views):
      return method.loss(params, state._replace(target_params=target), views,
                         jax.random.key(1))

    loss_and_grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))
    (loss, out), (grads, target_grads) = loss_and_grads(variables["params"],
                                                        variables["target_params"], batch)
    return dict(method=method, variables=variables, batch=batch, loss_and_grads=loss_and_grads,
                loss=loss, out=out, grads=grads, target_grads=target_grads)

  return build
