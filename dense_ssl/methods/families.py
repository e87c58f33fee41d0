"""Base classes by family of method, and encoder application with per-group BatchNorm.

* `MomentumPair`: an online encoder (backbone + online heads, e.g. projector + predictor) and
  a target encoder that is the EMA of the backbone and the target heads (e.g. projector),
  with per-group, optionally shuffled, BatchNorm and, as an option, queues of target keys.
  MoCo-v2, DenseCL, HoughCL, BYOL, UniVIP, MoCo-v3, DINO, ConMIM.
* `SingleEncoder`: one encoder and no target (SimCLR).

Each reads only its own config keys (listed in its docstring) and checks them in
`check_config`, once, for every method that uses them.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dense_ssl import losses
from dense_ssl.methods import base

BN_MODES = ("shuffle", "sync", "none")

# ---------------------------------------------------------------------------------------------
# Running an encoder with BatchNorm statistics per group of the batch.
#
# Multi-GPU MoCo/DenseCL compute BatchNorm statistics per GPU (32 images), and shuffle the key
# batch across GPUs first so that the key encoder cannot use the statistics of the very images
# its positives come from. Under `jit` on a global array BatchNorm would see the whole batch
# (SyncBN), so we reproduce the per-GPU semantics explicitly: the batch is cut into `groups`
# equal groups, vmapped, and each group gets its own statistics. The group count is a config
# value, not the device count, so 1 device and 8 devices compute the same numbers. A sharding
# constraint puts whole groups on each device, so no collective runs inside the backbone.
# ---------------------------------------------------------------------------------------------


def _data_devices() -> int:
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or "data" not in mesh.axis_names:
    return 1
  return mesh.shape["data"]


def apply_grouped(module: nn.Module, variables: base.Variables, x: jax.Array, *, groups: int,
                  train: bool = True, shuffle_rng: jax.Array | None = None,
                  batch_kwargs: dict[str, jax.Array] | None = None,
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
    batch_kwargs: more `__call__` arguments whose leading axis is the batch (e.g. a ViT's
      `keep_idx`/`pos_idx`): permuted and grouped together with `x`.
    **kwargs: passed to the module's `__call__` as they are.

  Returns the outputs (any pytree whose leaves have the batch as leading axis) in the original
  batch order, and the new batch statistics (averaged over groups), or the old ones when not
  training.
  """
  has_bn = "batch_stats" in variables
  batch_kwargs = dict(batch_kwargs or {})
  if not train or groups == 1:
    kwargs = {**kwargs, **batch_kwargs}
    if train and has_bn:
      out, upd = module.apply(variables, x, train=True, mutable=["batch_stats"], **kwargs)
      return out, upd["batch_stats"]
    return module.apply(variables, x, train=train, **kwargs), variables.get("batch_stats", {})

  batch = x.shape[0]
  if batch % groups:
    raise ValueError(f"Batch of {batch} is not divisible into {groups} BatchNorm groups.")
  devices = _data_devices()
  if groups % devices:
    raise ValueError(f"{groups} BatchNorm groups cannot be spread over {devices} devices; "
                     f"use a multiple of {devices} (config.method.bn_groups).")
  inputs = (x, batch_kwargs)
  if shuffle_rng is not None:
    perm = jax.random.permutation(shuffle_rng, batch)
    inputs = jax.tree.map(lambda a: jnp.take(a, perm, axis=0), inputs)
  grouped = jax.tree.map(lambda a: a.reshape((groups, batch // groups) + a.shape[1:]), inputs)
  if devices > 1:
    grouped = jax.lax.with_sharding_constraint(grouped, P("data"))

  def one(xi, kw):
    if has_bn:
      out, upd = module.apply(variables, xi, train=True, mutable=["batch_stats"], **kw,
                              **kwargs)
      return out, upd["batch_stats"]
    return module.apply(variables, xi, train=True, **kw, **kwargs), {}

  out, stats = jax.vmap(one)(*grouped)
  out = jax.tree.map(lambda o: o.reshape((-1,) + o.shape[2:]), out)
  stats = jax.tree.map(lambda s: s.mean(axis=0), stats)
  if shuffle_rng is not None:
    inv = jnp.argsort(perm)
    out = jax.tree.map(lambda o: jnp.take(o, inv, axis=0), out)
  return out, stats


def embedding_std(x: jax.Array) -> jax.Array:
  """Mean over dimensions of the batch std of L2-normalised embeddings (0 = collapse)."""
  return jnp.mean(jnp.std(losses.l2_normalize(x.astype(jnp.float32)), axis=0))


def check_bn(config: Any, num_devices: int) -> None:
  """`method.bn` and `method.bn_groups` against the batch and the device count."""
  m, b = config.method, config.batch_size
  if m.bn not in BN_MODES:
    raise ValueError(f"config.method.bn={m.bn!r}; valid choices: {', '.join(BN_MODES)}.")
  if m.bn_groups < 1:
    raise ValueError(f"config.method.bn_groups={m.bn_groups} must be >= 1.")
  if m.bn != "sync" and (b % m.bn_groups or m.bn_groups % num_devices):
    raise ValueError(f"config.method.bn_groups={m.bn_groups} must divide config.batch_size={b} "
                     f"and be a multiple of the device count ({num_devices}); or set "
                     f"config.method.bn='sync'.")


def check_queue(config: Any) -> None:
  """`method.queue_size` is a positive multiple of the batch (whole batches are enqueued)."""
  size, b = config.method.queue_size, config.batch_size
  if size <= 0 or size % b:
    raise ValueError(f"config.method.queue_size={size} must be a positive multiple of "
                     f"config.batch_size={b} (whole batches are enqueued).")


class MomentumPair(base.Method):
  """An online encoder and its EMA target, with per-group BatchNorm and optional queues.

  Config keys: `method.momentum`, `method.momentum_schedule` (the target's EMA),
  `method.bn` (shuffle | sync | none) and `method.bn_groups` (BatchNorm statistics per group
  of the batch; shuffle permutes the target's batch first), and `method.queue_size` when the
  method keeps queues (`uses_queues`).

  A subclass builds `self.encoder`, a module whose `__call__(x, train, *, online)` runs the
  backbone and the heads (all of them when `online`, the target's subset otherwise), and
  names the online-only heads in `online_only` (e.g. ("predictor",)): they get no target copy.
  """

  online_only: ClassVar[tuple[str, ...]] = ()
  uses_queues: ClassVar[bool] = False
  encoder: nn.Module

  def __init__(self, config: Any, durations: Any = None):
    super().__init__(config, durations)
    m = config.method
    self.bn, self.bn_groups = str(m.bn), int(m.bn_groups)
    self.queue_size = int(m.queue_size) if self.uses_queues else 0

  @classmethod
  def check_config(cls, config: Any, num_devices: int) -> None:
    super().check_config(config, num_devices)
    check_bn(config, num_devices)
    if cls.uses_queues:
      check_queue(config)

  def init_extra(self, rng: jax.Array) -> dict[str, Any]:
    """The method's non-parameter state (queues, centres) as `TrainState.extra`."""
    del rng
    return {}

  def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> base.Variables:
    """Online and target encoders start identical; each keeps its own BN statistics."""
    model_rng, extra_rng = jax.random.split(rng)
    first = self.views()[0].name
    variables = self.encoder.init(model_rng, batch[first].astype(jnp.float32), train=False,
                                  online=True)
    params = variables["params"]
    stats = variables.get("batch_stats", {})
    target = {k: jax.tree.map(jnp.array, v) for k, v in params.items()
              if k not in self.online_only}
    target_stats = {k: jax.tree.map(jnp.array, v) for k, v in stats.items()
                    if k not in self.online_only}
    return {"params": params, "target_params": target,
            "batch_stats": {"online": stats, "target": target_stats},
            "extra": self.init_extra(extra_rng)}

  @property
  def bn_group_count(self) -> int:
    return 1 if self.bn == "sync" else self.bn_groups

  def online(self, params: Any, state: base.MethodState, x: jax.Array,
             **kwargs) -> tuple[Any, Any]:
    """The online encoder on `x` (per-group BN): (outputs, new online batch_stats)."""
    variables = {"params": params, "batch_stats": state.batch_stats["online"]}
    return apply_grouped(self.encoder, variables, x, groups=self.bn_group_count, online=True,
                         **kwargs)

  def target(self, state: base.MethodState, x: jax.Array, rng: jax.Array,
             **kwargs) -> tuple[Any, Any]:
    """The target encoder on `x`, shuffled-BN when `bn` is "shuffle"; constant outputs."""
    variables = {"params": state.target_params, "batch_stats": state.batch_stats["target"]}
    shuffle_rng = rng if self.bn == "shuffle" else None
    out = apply_grouped(self.encoder, variables, x, groups=self.bn_group_count,
                        shuffle_rng=shuffle_rng, online=False, **kwargs)
    return jax.lax.stop_gradient(out)


class SingleEncoder(base.Method):
  """One encoder, no target (SimCLR). Config keys: `method.bn`, `method.bn_groups`.

  A subclass builds `self.encoder` (a module with `__call__(x, train)`).
  """

  encoder: nn.Module

  def __init__(self, config: Any, durations: Any = None):
    super().__init__(config, durations)
    self.bn, self.bn_groups = str(config.method.bn), int(config.method.bn_groups)

  @classmethod
  def check_config(cls, config: Any, num_devices: int) -> None:
    super().check_config(config, num_devices)
    check_bn(config, num_devices)

  def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> base.Variables:
    first = self.views()[0].name
    variables = self.encoder.init(rng, batch[first].astype(jnp.float32), train=False)
    return {"params": variables["params"], "target_params": {},
            "batch_stats": {"online": variables.get("batch_stats", {})}, "extra": {}}

  def online(self, params: Any, state: base.MethodState, x: jax.Array,
             **kwargs) -> tuple[Any, Any]:
    """The encoder on `x` with per-group BN: (outputs, new batch_stats)."""
    variables = {"params": params, "batch_stats": state.batch_stats["online"]}
    groups = 1 if self.bn == "sync" else self.bn_groups
    return apply_grouped(self.encoder, variables, x, groups=groups, **kwargs)

