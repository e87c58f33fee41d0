"""The Method interface, the method registry, and encoder application with per-group BatchNorm.

A method owns its model and its loss. `train.py` owns everything else (optimiser, EMA of the
target, mesh, data), so a method is a small object with two pure functions:

    init(rng, batch) -> {"params", "target_params", "batch_stats", "extra"}
    loss(params, state, batch, rng) -> (loss, (updates, metrics))

`updates` holds the new `batch_stats` and `extra` (queues, centres); `metrics` is a flat dict of
scalars. `state.target_params` is already momentum-updated for this step when `loss` is called
(DenseCL/MoCo update the key encoder *before* the key forward).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dense_ssl import registry

Variables = dict[str, Any]
LossOutput = tuple[jax.Array, tuple[dict[str, Any], dict[str, jax.Array]]]


class Method(Protocol):
  """What `train.py` needs from a method."""

  def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> Variables:
    ...

  def loss(self, params: Any, state: Any, batch: dict[str, jax.Array],
           rng: jax.Array) -> LossOutput:
    ...


_REGISTRY: registry.Registry[Callable[[Any], Method]] = registry.Registry(
    "method", "config.method.name")
# Class decorator: makes a method constructible by `create(config)` under a name.
register = _REGISTRY.register
names = _REGISTRY.names


def backbone_families(name: str) -> tuple[str, ...]:
  """The backbone families ("resnet", "vit") method `name` works with (default: ResNets)."""
  return getattr(_REGISTRY.get(name), "backbone_families", ("resnet",))


def create(config: Any) -> Method:
  """Builds the method named by `config.method.name` from the whole config."""
  return _REGISTRY.get(config.method.name)(config)


# ---------------------------------------------------------------------------------------------
# Running an encoder with BatchNorm statistics per group of the batch.
#
# Multi-GPU MoCo/DenseCL compute BatchNorm statistics per GPU (32 images), and shuffle the key
# batch across GPUs first so that the key encoder cannot use the statistics of the very images
# its positives come from. Under `jit` on a global array BatchNorm would see the whole batch
# (SyncBN), so we reproduce the per-GPU semantics explicitly: the batch is cut into `groups`
# equal groups and each group gets its own statistics. The group count is a config value, not
# the device count, so 1 device and 8 devices compute the same numbers. `shard_map` over the
# data axis keeps each device's groups local (no collective inside the backbone); inside a
# device the local groups are vmapped.
# ---------------------------------------------------------------------------------------------


def _data_axis_size(mesh) -> int:
  if mesh is None or mesh.empty or "data" not in mesh.axis_names:
    return 1
  return mesh.shape["data"]


def apply_grouped(module: nn.Module, variables: Variables, x: jax.Array, *, groups: int,
                  train: bool = True, shuffle_rng: jax.Array | None = None,
                  **kwargs) -> tuple[Any, Any]:
  """Applies `module` to `x` with BatchNorm statistics per group; returns (outputs, batch_stats).

  Args:
    module: a linen module whose `__call__(x, train=...)` uses `batch_stats` when it has BN.
    variables: {"params": ..., "batch_stats": ...}.
    x: (B, ...) inputs; B must be divisible by `groups`.
    groups: number of BatchNorm groups (1 = statistics over the whole global batch).
    train: training mode (batch statistics) or eval mode (running averages).
    shuffle_rng: when given, the batch is permuted before the forward pass and the outputs
      are permuted back (shuffle-BN), so BN groups mix images from the whole global batch.

  Returns the outputs (any pytree whose leaves have the batch as leading axis) in the original
  batch order, and the new batch statistics (averaged over groups), or the old ones when not
  training.
  """
  has_bn = "batch_stats" in variables
  if not train or groups == 1:
    if train and has_bn:
      out, upd = module.apply(variables, x, train=True, mutable=["batch_stats"], **kwargs)
      return out, upd["batch_stats"]
    return module.apply(variables, x, train=train, **kwargs), variables.get("batch_stats", {})

  batch = x.shape[0]
  if batch % groups:
    raise ValueError(f"Batch of {batch} is not divisible into {groups} BatchNorm groups.")
  if shuffle_rng is not None:
    perm = jax.random.permutation(shuffle_rng, batch)
    x = jnp.take(x, perm, axis=0)

  def run_local(variables, x, n_groups, axis_name):
    xg = x.reshape((n_groups, x.shape[0] // n_groups) + x.shape[1:])

    def one(xi):
      if has_bn:
        out, upd = module.apply(variables, xi, train=True, mutable=["batch_stats"], **kwargs)
        return out, upd["batch_stats"]
      return module.apply(variables, xi, train=True, **kwargs), {}

    out, stats = jax.vmap(one)(xg)
    out = jax.tree.map(lambda o: o.reshape((-1,) + o.shape[2:]), out)
    stats = jax.tree.map(lambda s: s.mean(axis=0), stats)
    if axis_name is not None:
      stats = jax.lax.pmean(stats, axis_name)
    return out, stats

  mesh = jax.sharding.get_abstract_mesh()
  n_dev = _data_axis_size(mesh)
  if n_dev > 1:
    if groups % n_dev:
      raise ValueError(f"{groups} BatchNorm groups cannot be spread over {n_dev} devices; "
                       f"use a multiple of {n_dev} (config.method.bn_groups).")

    def local(v, xx):
      # The replicated variables become explicitly device-varying (whose transpose sums their
      # gradients over devices, as the implicit cast would): custom-VJP layers such as
      # models/conv.py's must return gradients of their inputs' exact varying-axes type.
      v = jax.tree.map(lambda a: jax.lax.pcast(a, "data", to="varying"), v)
      return run_local(v, xx, groups // n_dev, "data")

    out, stats = jax.shard_map(local, mesh=mesh, in_specs=(P(), P("data")),
                               out_specs=(P("data"), P()))(variables, x)
  else:
    out, stats = run_local(variables, x, groups, None)

  if shuffle_rng is not None:
    inv = jnp.argsort(perm)
    out = jax.tree.map(lambda o: jnp.take(o, inv, axis=0), out)
  return out, stats


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps), as torch.nn.functional.normalize (the references' convention)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)
