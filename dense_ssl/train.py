"""The trainer: `run(config, workdir)` trains any registered method, resumably, on a device mesh.

Stages follow big_vision: checks, logging, mesh, input, then `build` (durations, method,
optimiser, initial state, the compiled step; shared with the benchmarks and the tests),
checkpoint restore, the loop. Methods plug in through `dense_ssl.methods` (see its `base.py`
for the contract) and never see the optimiser, the mesh or the data pipeline: adding one is a
file in `methods/`, a config and a test, and no edit here.
"""

from __future__ import annotations

import dataclasses
import functools
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from dense_ssl import checkpoint, ema, optim, sharding, xla_cpu
from dense_ssl import methods as methods_lib
from dense_ssl.data import augment, spec
from dense_ssl.state import TrainState

# Exit code after a preemption save (EX_TEMPFAIL): launchers requeue on it.
PREEMPTED_EXIT_CODE = 75
NAN_POLICIES = ("stop", "skip_step")
MAX_IN_FLIGHT = 2


class NonFiniteError(RuntimeError):
  """A loss or gradient became NaN/Inf; the last good checkpoint is kept."""


class Preempted(SystemExit):
  """Raised after the preemption checkpoint is written; carries PREEMPTED_EXIT_CODE."""

  def __init__(self, step: int):
    super().__init__(PREEMPTED_EXIT_CODE)
    self.step = step


# ----------------------------------------------------------------------------------------------
# Checks: every config mistake we can see before compiling is reported in one line.
# ----------------------------------------------------------------------------------------------
def check_config(config: Any, num_devices: int, num_processes: int = 1) -> None:
  """Raises ValueError naming the offending value and the valid choices."""
  method_cls = methods_lib.base.method_class(config)
  for key, value, valid in (("optim.name", config.optim.name, optim.OPTIMIZERS),
                            ("optim.schedule", config.optim.schedule, optim.SCHEDULES)):
    if value not in valid:
      raise ValueError(f"Unknown config.{key}={value!r}; valid choices: {', '.join(valid)}.")
  if config.nan_policy not in NAN_POLICIES:
    raise ValueError(f"config.nan_policy={config.nan_policy!r}; valid choices: "
                     f"{', '.join(NAN_POLICIES)}.")
  b = config.batch_size
  if b <= 0 or b % num_devices:
    raise ValueError(f"config.batch_size={b} must be a positive multiple of the device count "
                     f"({num_devices}).")
  if b % num_processes:
    raise ValueError(f"config.batch_size={b} is not divisible by the {num_processes} processes.")
  optim.durations(config, num_examples=b)  # exactly one duration
  method_cls.check_config(config, num_devices)
  method_cls(config).check_views()
  create_evaluators(config)  # Builds nothing heavy (data loads on first use); checks the keys.


# ----------------------------------------------------------------------------------------------
# The step: a pure function of (state, batch), compiled with explicit shardings.
# ----------------------------------------------------------------------------------------------
def train_step(state: TrainState, batch: dict[str, jax.Array], *, method: Any,
               views: tuple[Any, ...], aug_cfg: Any,
               lr_fn: optax.Schedule) -> tuple[TrainState, dict[str, Any]]:
  """One optimisation step: colour augmentation, EMA of the target, loss, update, NaN guard."""
  rng = jax.random.fold_in(state.rng, state.step)
  aug_rng, loss_rng = jax.random.split(rng)
  batch = augment.augment_views(aug_rng, batch, views, aug_cfg)

  # The momentum update comes before the target forward (DenseCL/MoCo order).
  momentum = method.momentum(state.step)
  target = ema.update(state.target_params, state.params, momentum)
  inputs = methods_lib.MethodState(step=state.step, target_params=target,
                                   batch_stats=state.batch_stats, extra=state.extra)

  grad_fn = jax.value_and_grad(method.loss, has_aux=True)
  (loss, out), grads = grad_fn(state.params, inputs, batch, loss_rng)
  opt_updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, opt_updates)

  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_state = state.replace(step=state.step + 1, params=params, target_params=target,
                            batch_stats=out.batch_stats, opt_state=opt_state, extra=out.extra)
  # A non-finite step is never applied: the state (and any checkpoint of it) stays good.
  kept = state.replace(step=state.step + 1)
  new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, kept)

  metrics = {f"train/{k}": v for k, v in out.metrics.items()}
  metrics.update({"train/loss": loss, "train/lr": lr_fn(state.step),
                  "train/momentum": jnp.asarray(momentum, jnp.float32),
                  "train/grad_norm": grad_norm,
                  "train/param_norm": optax.tree.norm(params),
                  "train/update_norm": optax.tree.norm(opt_updates),
                  "train/finite": finite.astype(jnp.float32)})
  return new_state, metrics


@dataclasses.dataclass(frozen=True)
class Built:
  """Everything `build` wires together for a config.

  Attributes:
    method: the method, built with the run's durations.
    durations: total steps, steps per epoch, warm-up steps.
    lr_fn: the learning-rate schedule.
    tx: the optimiser (with the config's hooks).
    state: the initial state, replicated over the mesh.
    step: the jitted `train_step(state, batch)`, explicit shardings, donated state.
    batch_spec: {key: (shape, dtype)} of a global batch of the method's views.
  """
  method: Any
  durations: optim.Durations
  lr_fn: optax.Schedule
  tx: optax.GradientTransformation
  state: TrainState
  step: Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, Any]]]
  batch_spec: dict[str, tuple[tuple[int, ...], Any]]


def build(config: Any, mesh: jax.sharding.Mesh, num_examples: int,
          element_spec: dict[str, tuple[tuple[int, ...], Any]] | None = None) -> Built:
  """The method, optimiser, schedules, initial state and compiled step of `config`.

  Args:
    config: the run's config.
    mesh: the device mesh; the state is replicated over it and the batch split on "data".
    num_examples: images per epoch (fixes the durations).
    element_spec: {key: (shape, dtype)} of a batch as the input pipeline makes it (its
      `Batches.element_spec`); by default the method's views' `spec.batch_shapes`. The
      parameters are initialised on zeros of (at most 8 rows of) this spec.
  """
  durations = optim.durations(config, num_examples)
  method = methods_lib.create(config, durations)
  batch_spec = spec.batch_shapes(method.views(), config.batch_size)
  init_batch = spec.example_batch(element_spec or batch_spec, rows=min(config.batch_size, 8))

  lr_fn = optim.learning_rate_fn(config.optim, durations.total_steps, durations.warmup_steps,
                                 config.batch_size)
  rng = jax.random.key(config.seed)
  init_rng, state_rng = jax.random.split(rng)
  abstract = jax.eval_shape(method.init, init_rng, init_batch)
  tx = optim.create_optimizer(config.optim, lr_fn, abstract["params"], durations)

  def init(rng):
    return TrainState.create(variables=method.init(rng, init_batch), tx=tx, rng=state_rng)

  with jax.set_mesh(mesh):
    state = jax.jit(init, out_shardings=sharding.replicated(mesh))(init_rng)
  return Built(method=method, durations=durations, lr_fn=lr_fn, tx=tx, state=state,
               step=jit_step(method, config, lr_fn, state, mesh), batch_spec=batch_spec)


def jit_step(method: Any, config: Any, lr_fn: optax.Schedule, state: TrainState,
             mesh: jax.sharding.Mesh) -> Callable[..., Any]:
  """`train_step` of `method` jitted with the state's shardings, the batch split over "data",
  replicated metrics and the state donated."""
  step_fn = functools.partial(train_step, method=method, views=method.views(),
                              aug_cfg=config.augment, lr_fn=lr_fn)
  state_sharding = jax.tree.map(lambda x: x.sharding, state)
  return jax.jit(step_fn, in_shardings=(state_sharding, sharding.batch_sharded(mesh)),
                 out_shardings=(state_sharding, sharding.replicated(mesh)),
                 donate_argnums=(0,), compiler_options=xla_cpu.compiler_options())


# ----------------------------------------------------------------------------------------------
# Host-side helpers of the loop.
# ----------------------------------------------------------------------------------------------
class _PreemptionFlag:
  """SIGTERM (Cloud TPU, SLURM, Kubernetes) as a flag the loop reads every step, for free.

  One process: our own SIGTERM handler sets it. Several: JAX's preemption sync manager (which
  `jax.distributed.initialize` starts and which handles SIGTERM itself) tells every process
  the same step to stop at, with no collective in the loop; see `should_stop`.
  """

  def __init__(self):
    self.received_at: float | None = None  # time.monotonic() of the signal (one process)
    self._old = None
    self._multi = jax.process_count() > 1

  def __enter__(self):
    if self._multi:
      return self
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a notebook worker): no handler
      self._old = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.received_at = time.monotonic()

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)

  def should_stop(self, step: int) -> bool:
    """Whether to save and stop after `step` (every process gets the same answer)."""
    if not self._multi:
      return self.received_at is not None
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return multihost_utils.reached_preemption_sync_point(step)


def _first_nonfinite(history: list[tuple[int, dict[str, Any]]]) -> tuple[int, str, float] | None:
  for step, m in history:
    if m["train/finite"] < 0.5:
      for name in ("train/loss", "train/grad_norm"):
        if not np.isfinite(m[name]):
          return step, name, float(m[name])
      return step, "train/loss", float(m["train/loss"])
  return None


def _summarise(history: list[tuple[int, dict[str, Any]]]) -> dict[str, float]:
  keys = history[-1][1].keys()
  return {k: float(np.mean([m[k] for _, m in history])) for k in keys}


# ----------------------------------------------------------------------------------------------
# run()
# ----------------------------------------------------------------------------------------------
def run(config: Any, workdir: str) -> TrainState:
  """Trains `config` in `workdir`, resuming from the newest checkpoint there; returns the state."""
  # TensorFlow (input) and clu (writers) are needed only here: train_step runs without them.
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  from dense_ssl.data import pipeline  # pylint: disable=g-import-not-at-top

  # --- Checks and logging ------------------------------------------------------------------
  check_config(config, jax.device_count(), jax.process_count())
  if jax.process_index() == 0:
    checkpoint.save_config(workdir, config)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() != 0)

  # --- Mesh ----------------------------------------------------------------------------------
  mesh = sharding.create_mesh()
  logging.info("Mesh %s over %d devices in %d processes.", dict(mesh.shape), jax.device_count(),
               jax.process_count())

  # --- Input (it starts where the newest checkpoint ends) ----------------------------------
  manager = checkpoint.create_manager(workdir, keep=config.keep_checkpoints,
                                      every_steps=config.checkpoint_every_steps)
  start_step = manager.latest_step() or 0
  method_cls = methods_lib.base.method_class(config)
  probe = method_cls(config)  # views and sampler only; `build` makes the real one
  batches = pipeline.create_iterator(
      config.data, views=probe.views(), sampler=probe.crop_sampler,
      global_batch_size=config.batch_size, seed=config.seed, start_step=start_step,
      process_index=jax.process_index(), process_count=jax.process_count())

  # --- Method, optimiser, state and the compiled step ---------------------------------------
  built = build(config, mesh, batches.num_examples, batches.element_spec)
  method, total_steps = built.method, built.durations.total_steps
  logging.info("%d steps (%d per epoch of %d images).", total_steps,
               built.durations.steps_per_epoch, batches.num_examples)
  evaluators = create_evaluators(config, method)
  state = checkpoint.restore_latest(manager, built.state)
  if start_step:
    logging.info("Resumed from the checkpoint of step %d in %s.", start_step, workdir)
  writer.write_hparams({k: v for k, v in _flat(config.to_dict()).items()
                        if isinstance(v, (int, float, str, bool))})

  if evaluators and config.eval_every_steps and start_step == 0:
    # The initialisation's numbers: the baseline each later evaluation is read against.
    _run_evals(evaluators, method, state, 0, writer, workdir)

  # --- Loop ----------------------------------------------------------------------------------
  history: list[tuple[int, dict[str, Any]]] = []
  pending: list[tuple[int, dict[str, Any]]] = []
  t_log, step_log = time.perf_counter(), start_step
  compile_s = None
  with _PreemptionFlag() as preempt, jax.set_mesh(mesh):
    for step in range(start_step, total_steps):
      batch = sharding.to_global(next(batches), mesh)
      t0 = time.perf_counter()
      # Nothing moves between host and device implicitly inside the step's dispatch.
      with jax.transfer_guard("disallow"):
        state, metrics = built.step(state, batch)
      pending.append((step, metrics))
      # At most MAX_IN_FLIGHT steps queued on the device: async dispatch would otherwise let the
      # host run many steps ahead, and a SIGTERM would wait for all of them before the save.
      if len(pending) > MAX_IN_FLIGHT:
        jax.block_until_ready(pending[-1 - MAX_IN_FLIGHT][1])
      if compile_s is None:
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - t0
        logging.info("First step (compile + run) took %.1fs.", compile_s)
        t_log, step_log = time.perf_counter(), step + 1

      done = step + 1
      is_log = done % config.log_every_steps == 0 or done == total_steps
      is_ckpt = done % config.checkpoint_every_steps == 0 or done == total_steps
      preempted = preempt.should_stop(done)
      if is_log or is_ckpt or preempted or config.nan_policy == "stop" and done == total_steps:
        fetched = [(s, jax.device_get(m)) for s, m in pending]
        pending.clear()
        history.extend(fetched)
        bad = _first_nonfinite(fetched)
        if bad is not None and config.nan_policy == "stop":
          manager.wait_until_finished()
          s, name, value = bad
          raise NonFiniteError(
              f"{name} is {value} at step {s}; the run stopped and its last good checkpoint "
              f"(step {manager.latest_step()}) is kept in {workdir}. Lower config.optim.lr, check "
              f"the data, or set config.nan_policy='skip_step' to skip such steps.")
      if is_log and history:
        summary = _summarise(history)
        summary["train/skipped_steps"] = float(sum(m["train/finite"] < 0.5 for _, m in history))
        history.clear()
        dt = time.perf_counter() - t_log
        steps_done = done - step_log
        img_s = steps_done * config.batch_size / max(dt, 1e-9)
        summary["train/img_per_sec"] = img_s
        summary["data/skipped_images"] = float(batches.skipped_images)
        summary["z/secs/compile"] = compile_s or 0.0
        writer.write_scalars(done, summary)
        eta = (total_steps - done) * dt / max(steps_done, 1)
        logging.info("step %d/%d  loss %.4f  %.1f img/s  ETA %s", done, total_steps,
                     summary["train/loss"], img_s, _hms(eta))
        t_log, step_log = time.perf_counter(), done
      if is_ckpt or preempted:
        checkpoint.save(manager, state, force=True)
      # After the save: an evaluator that fails cannot cost the checkpoint.
      if evaluators and not preempted and (
          done == total_steps or config.eval_every_steps and done % config.eval_every_steps == 0):
        _run_evals(evaluators, method, state, done, writer, workdir)
      if preempted:
        manager.wait_until_finished()
        writer.flush()
        since = (f"{time.monotonic() - preempt.received_at:.1f}s after the signal"
                 if preempt.received_at is not None else "at the agreed step")
        logging.warning("SIGTERM: saved the checkpoint of step %d %s; exiting with code %d so "
                        "the launcher can requeue.", done, since, PREEMPTED_EXIT_CODE)
        manager.close()
        raise Preempted(done)

  manager.wait_until_finished()
  manager.close()
  writer.flush()
  if jax.process_index() == 0:
    _export_backbone(method, state, workdir)
  return state


def create_evaluators(config: Any, method: Any = None) -> dict[str, Any]:
  """The evaluators of `config.evals` for the method's backbone (built, so a bad entry fails
  before compiling)."""
  evals = config.evals.to_dict() if "evals" in config else {}
  if not evals:
    return {}
  from dense_ssl import evaluate  # pylint: disable=g-import-not-at-top
  method = method or methods_lib.create(config)
  try:
    return evaluate.from_config(evals, method.backbone)
  except ValueError as e:
    raise ValueError(f"config.evals: {e}") from None


def _local_copy(tree: Any) -> Any:
  """This process's copy of a replicated pytree, as host numpy (no other process involved)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def _online_backbone(method: Any, state: TrainState) -> dict[str, Any]:
  return method.backbone_variables(_local_copy(state.params), _local_copy(state.batch_stats))


def _run_evals(evaluators: dict[str, Any], method: Any, state: TrainState, step: int,
               writer: Any, workdir: str) -> None:
  """Runs the evaluators on the online backbone in process 0; logs and writes eval_<step>.json."""
  if jax.process_index() != 0:
    return
  from dense_ssl.evaluate import runner  # pylint: disable=g-import-not-at-top
  results = runner.run_timed(evaluators, _online_backbone(method, state))
  writer.write_scalars(step, {f"eval/{k}": v for k, v in results.items()})
  path = runner.write_results(workdir, step, results)
  logging.info("Evaluation at step %d (%s):\n%s", step, path, runner.format_table(results))


def _export_backbone(method: Any, state: TrainState, workdir: str) -> None:
  """Writes the final backbone in every format of its family that this machine can write.

  Reads the replicated state from this process's own device copy, so no other process (and no
  checkpoint read, which would need every process) is involved.
  """
  from dense_ssl import export  # pylint: disable=g-import-not-at-top
  variables = _online_backbone(method, state)
  for fmt in export.available_formats(method.backbone):
    path = export.export(method.backbone, variables, fmt, export.default_output(workdir, fmt))
    logging.info("Exported the backbone for %s: %s", fmt, path)


def _hms(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out
