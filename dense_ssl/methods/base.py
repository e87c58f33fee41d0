"""The method contract: what a self-supervised method declares, computes, and exposes.

A method is one file in `dense_ssl/methods/`, one config and one test. It subclasses `Method`
(usually through a family base class of `dense_ssl.methods.families`) and registers itself:

    @base.register("mymethod")
    class MyMethod(families.MomentumPair): ...

What a method DECLARES (read before anything compiles):
  * `families`: the backbone families it works with ("resnet", "vit").
  * `views()`: the views of each image it needs, as `ViewSpec`s (name, size, crop scale and
    ratio, flip, colour preset, correspondence grid, token mask, shared crops). The input
    pipeline builds them on the host and the trainer colour-augments each on device by its
    preset, so the `batch` a method gets holds exactly these views (`dense_ssl.data.spec`).
  * `crop_sampler`: the registered host sampler that chooses the views' crops together
    ("independent" by default; e.g. crops whose overlap holds object proposals).
  * `check_config(config, num_devices)`: a classmethod raising ValueError with the key and the
    fix for every config mistake it can see; the trainer calls it before compiling. Family base
    classes check their own keys (BatchNorm groups, queues) and call `super()`.

What a method COMPUTES (pure functions, traced under `jit`):
  * `init(rng, batch) -> {"params", "target_params", "batch_stats", "extra"}`: the online
    parameters (differentiated), the target (EMA) parameters ({} for methods without a target),
    BatchNorm statistics and extra state (queues, centres).
  * `loss(params, state, batch, rng) -> (loss, StepOutput)`: `state` is a `MethodState`
    (step, target parameters already momentum-updated for this step, batch statistics, extra);
    `StepOutput` holds the new batch statistics and extra state and a flat dict of scalar
    metrics. The trainer differentiates `loss` with respect to `params` only.
  * `momentum(step)`: the EMA momentum of the target at `step` (the trainer updates the target
    with it before calling `loss`, DenseCL/MoCo's order).

How the rest of the system REACHES THE BACKBONE (evaluation, export, visualisation and
`checkpoint.load_backbone` ask the method, for ResNets and ViTs alike):
  * `backbone`: a `dense_ssl.models.Backbone` (name, module, family, stride).
  * `backbone_variables(params, batch_stats)`: the online backbone's {"params", "batch_stats"}
    from a state's (or a raw checkpoint's) trees.

Methods never touch the optimiser, the mesh or the data pipeline; what they may ask of the
optimiser (parameter labels, clipping, weight-decay schedules, a frozen layer for a while) is
configured under `config.optim` (see `dense_ssl.optim`).
"""

from __future__ import annotations

import abc
import importlib
from typing import Any, Callable, ClassVar, NamedTuple

import jax

from dense_ssl import ema, models, optim, registry
from dense_ssl.data import spec

Variables = dict[str, Any]
ViewSpec = spec.ViewSpec


class MethodState(NamedTuple):
  """What `Method.loss` sees of the train state besides the parameters it differentiates."""
  step: jax.Array  # () int32, the step being computed (0-based)
  target_params: Any  # EMA parameters, already updated for this step ({} without a target)
  batch_stats: Any
  extra: Any


class StepOutput(NamedTuple):
  """The auxiliary result of `Method.loss`: new non-parameter state and metrics."""
  batch_stats: Any
  extra: Any
  metrics: dict[str, jax.Array]


LossOutput = tuple[jax.Array, StepOutput]


class Method(abc.ABC):
  """The base class of every method (module docstring: the contract)."""

  families: ClassVar[tuple[str, ...]] = ("resnet",)
  crop_sampler: ClassVar[str] = "independent"

  def __init__(self, config: Any, durations: optim.Durations | None = None):
    """Reads the method's own config keys; `durations` fixes step-based schedules.

    Without `durations` (unit tests of the loss), schedules see a one-step run.
    """
    self.config = config
    self.durations = durations or optim.Durations(total_steps=1, steps_per_epoch=1,
                                                  warmup_steps=0)
    self.backbone: models.Backbone = models.build(config.model)

  # --- Declared ----------------------------------------------------------------------------

  @classmethod
  def check_config(cls, config: Any, num_devices: int) -> None:
    """Raises ValueError for config values this method cannot train with."""
    name = config.model.name
    if name not in models.names():
      raise ValueError(f"Unknown backbone config.model.name={name!r}; valid choices: "
                       f"{', '.join(models.names())}.")
    if models.family(name) not in cls.families:
      valid = [n for n in models.names() if models.family(n) in cls.families]
      raise ValueError(f"config.model.name={name!r} cannot be used by method "
                       f"{config.method.name!r}; valid choices: {', '.join(valid)}.")
    m = config.method
    if "momentum_schedule" in m and m.momentum_schedule not in ema.SCHEDULES:
      raise ValueError(f"Unknown config.method.momentum_schedule={m.momentum_schedule!r}; "
                       f"valid choices: {', '.join(ema.SCHEDULES)}.")

  @abc.abstractmethod
  def views(self) -> tuple[ViewSpec, ...]:
    """The views of each image this method trains on."""

  def check_views(self) -> None:
    """The declared views against the backbone and `config.augment` (see `spec.check_views`)."""
    views = self.views()
    spec.check_views(views, self.config.augment.presets)
    stride = self.backbone.stride
    for v in views:
      if v.size % stride:
        raise ValueError(f"View {v.name!r} is {v.size} px, not a multiple of the backbone's "
                         f"stride {stride} ({self.backbone.name}); e.g. "
                         f"{max(stride, v.size // stride * stride)} (config.data.image_size).")
      if v.grid and v.grid != v.size // stride:
        raise ValueError(f"View {v.name!r}: its grid {v.grid} must be size // stride = "
                         f"{v.size // stride} to align with the backbone's cells.")

  # --- Computed ----------------------------------------------------------------------------

  @abc.abstractmethod
  def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> Variables:
    """{"params", "target_params", "batch_stats", "extra"} for a batch of the views."""

  @abc.abstractmethod
  def loss(self, params: Any, state: MethodState, batch: dict[str, jax.Array],
           rng: jax.Array) -> LossOutput:
    """(loss, StepOutput) for one augmented batch; differentiated w.r.t. `params`."""

  def momentum(self, step: jax.Array) -> jax.Array:
    """The target's EMA momentum at `step`: `config.method.momentum` and its schedule."""
    m = self.config.method
    return ema.momentum_at(step, self.durations.total_steps, float(m.get("momentum", 0.0)),
                           str(m.get("momentum_schedule", "constant")))

  # --- The backbone, for evaluation and export -----------------------------------------------

  def backbone_variables(self, params: Any, batch_stats: Any) -> Variables:
    """The online backbone's {"params", "batch_stats"}: `params["backbone"]` and its BatchNorm
    statistics `batch_stats["online"]["backbone"]` (empty for a ViT)."""
    stats = batch_stats.get("online", {}) if hasattr(batch_stats, "get") else {}
    return {"params": params["backbone"], "batch_stats": stats.get("backbone", {})}


_REGISTRY: registry.Registry[Callable[..., Method]] = registry.Registry(
    "method", "config.method.name")
# Class decorator: makes a method constructible by `create(config)` under a name.
register = _REGISTRY.register
names = _REGISTRY.names


def method_class(config: Any) -> type[Method]:
  """The registered class of `config.method.name`.

  `config.method.module`, when set, is imported first: a method defined outside dense_ssl
  (a research project's own package, a test file) registers itself on import.
  """
  module = config.method.get("module", "") if hasattr(config.method, "get") else ""
  if module:
    try:
      importlib.import_module(module)
    except ImportError as e:
      raise ValueError(f"config.method.module={module!r} cannot be imported ({e}); it must be "
                       f"an importable module that registers config.method.name.") from e
  return _REGISTRY.get(config.method.name)


def create(config: Any, durations: optim.Durations | None = None) -> Method:
  """Builds the method named by `config.method.name` from the whole config."""
  return method_class(config)(config, durations)
