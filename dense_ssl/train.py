"""The trainer: `run(config, workdir)` trains any registered method, resumably, on a device mesh.

Stages follow big_vision: checks, logging, mesh, input, method and optimiser, state (initialised
directly with replicated shardings), checkpoint restore, the compiled step, the loop. Methods plug
in through `dense_ssl.methods` and never see the optimiser, the mesh or the data pipeline.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from dense_ssl import checkpoint, ema, models, optim, sharding, xla_cpu
from dense_ssl import methods as methods_lib
from dense_ssl.data import augment
from dense_ssl.state import TrainState

# Exit code after a preemption save (EX_TEMPFAIL): launchers requeue on it.
PREEMPTED_EXIT_CODE = 75
NAN_POLICIES = ("stop", "skip_step")
BN_MODES = ("shuffle", "sync", "none")
MODEL_STRIDE = 32
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
  if config.method.name not in methods_lib.names():
    raise ValueError(f"Unknown method config.method.name={config.method.name!r}; valid choices: "
                     f"{', '.join(methods_lib.names())}.")
  if config.model.name not in models.names():
    raise ValueError(f"Unknown backbone config.model.name={config.model.name!r}; valid choices: "
                     f"{', '.join(models.names())}.")
  families = methods_lib.base.backbone_families(config.method.name)
  if models.family(config.model.name) not in families:
    valid = [n for n in models.names() if models.family(n) in families]
    raise ValueError(f"config.model.name={config.model.name!r} cannot be used by method "
                     f"{config.method.name!r}; valid choices: {', '.join(valid)}.")
  for key, value, valid in (("optim.name", config.optim.name, optim.OPTIMIZERS),
                            ("optim.schedule", config.optim.schedule, optim.SCHEDULES),
                            ("method.momentum_schedule",
                             config.method.get("momentum_schedule", "constant"), ema.SCHEDULES)):
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
  size = config.data.image_size
  if size <= 0 or size % MODEL_STRIDE:
    raise ValueError(f"config.data.image_size={size} must be a positive multiple of "
                     f"{MODEL_STRIDE} (the backbone's output stride), e.g. "
                     f"{max(MODEL_STRIDE, size // MODEL_STRIDE * MODEL_STRIDE)}.")
  m = config.method
  if "queue_size" in m and (m.queue_size <= 0 or m.queue_size % b):
    raise ValueError(f"config.method.queue_size={m.queue_size} must be a positive multiple of "
                     f"config.batch_size={b} (whole batches are enqueued).")
  if "bn" in m:
    if m.bn not in BN_MODES:
      raise ValueError(f"config.method.bn={m.bn!r}; valid choices: {', '.join(BN_MODES)}.")
    if m.bn != "sync" and (b % m.bn_groups or m.bn_groups % num_devices):
      raise ValueError(f"config.method.bn_groups={m.bn_groups} must divide config.batch_size={b} "
                       f"and be a multiple of the device count ({num_devices}); or set "
                       f"config.method.bn='sync'.")
  if (config.total_epochs > 0) == (config.total_steps > 0):
    raise ValueError(f"Set exactly one of config.total_epochs ({config.total_epochs}) and "
                     f"config.total_steps ({config.total_steps}) to a positive value.")
  create_evaluators(config)  # Builds nothing heavy (data loads on first use); checks the keys.


def resolve_steps(config: Any, num_examples: int) -> tuple[int, int, int]:
  """(total_steps, steps_per_epoch, warmup_steps) from the config's durations."""
  steps_per_epoch = max(num_examples // config.batch_size, 1)
  total = config.total_steps or int(math.ceil(config.total_epochs * steps_per_epoch))
  warmup = int(round(config.optim.warmup_epochs * steps_per_epoch))
  return total, steps_per_epoch, warmup


# ----------------------------------------------------------------------------------------------
# The step: a pure function of (state, batch), compiled with explicit shardings.
# ----------------------------------------------------------------------------------------------
def train_step(state: TrainState, batch: dict[str, jax.Array], *, method: Any, config: Any,
               lr_fn: optax.Schedule, momentum_fn: Any) -> tuple[TrainState, dict[str, Any]]:
  """One optimisation step: colour augmentation, EMA of the target, loss, update, NaN guard."""
  rng = jax.random.fold_in(state.rng, state.step)
  aug_rng, loss_rng = jax.random.split(rng)
  batch = augment.augment_batch(aug_rng, batch, config.augment)

  # The momentum update comes before the key forward (DenseCL/MoCo order).
  momentum = momentum_fn(state.step)
  target = ema.update(state.target_params, state.params, momentum)
  state_in = state.replace(target_params=target)

  grad_fn = jax.value_and_grad(method.loss, has_aux=True)
  (loss, (updates, metrics)), grads = grad_fn(state.params, state_in, batch, loss_rng)
  opt_updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, opt_updates)

  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_state = state.replace(step=state.step + 1, params=params, target_params=target,
                            batch_stats=updates["batch_stats"], opt_state=opt_state,
                            extra=updates["extra"])
  # A non-finite step is never applied: the state (and any checkpoint of it) stays good.
  kept = state.replace(step=state.step + 1)
  new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, kept)

  metrics = {f"train/{k}": v for k, v in metrics.items()}
  metrics.update({"train/loss": loss, "train/lr": lr_fn(state.step),
                  "train/momentum": jnp.asarray(momentum, jnp.float32),
                  "train/grad_norm": grad_norm,
                  "train/param_norm": optax.tree.norm(params),
                  "train/update_norm": optax.tree.norm(opt_updates),
                  "train/finite": finite.astype(jnp.float32)})
  return new_state, metrics


def example_batch(config: Any, size: int) -> dict[str, jax.Array]:
  """Zeros with the shapes of an augmented batch, for initialising parameters."""
  s, g = config.data.image_size, config.data.image_size // MODEL_STRIDE
  img = jnp.zeros((size, s, s, 3), jnp.float32)
  grid = jnp.zeros((size, g, g, 2), jnp.float32)
  mask = jnp.ones((size, g, g), bool)
  box = jnp.tile(jnp.array([[0.0, 0.0, 1.0, 1.0]]), (size, 1))
  flip = jnp.zeros((size,), bool)
  return dict(view1=img, view2=img, coords1=grid, coords2=grid, valid1=mask, valid2=mask,
              box1=box, box2=box, flip1=flip, flip2=flip)


def create_state(config: Any, method: Any, tx: optax.GradientTransformation,
                 mesh: jax.sharding.Mesh) -> TrainState:
  """Initialises the state on device, replicated over the mesh."""
  rng = jax.random.key(config.seed)
  init_rng, state_rng = jax.random.split(rng)
  init_size = min(config.batch_size, 8)

  def init(rng):
    variables = method.init(rng, example_batch(config, init_size))
    return TrainState.create(variables=variables, tx=tx, rng=state_rng)

  with jax.set_mesh(mesh):
    return jax.jit(init, out_shardings=sharding.replicated(mesh))(init_rng)


# ----------------------------------------------------------------------------------------------
# Host-side helpers of the loop.
# ----------------------------------------------------------------------------------------------
class _PreemptionFlag:
  """Turns SIGTERM (Cloud TPU, SLURM, Kubernetes) into a flag the loop checks every step."""

  def __init__(self):
    self.received_at: float | None = None  # time.monotonic() of the signal
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a notebook worker): no handler
      self._old = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.received_at = time.monotonic()

  @property
  def raised(self) -> bool:
    return self.received_at is not None

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)

  def any_process(self) -> bool:
    if jax.process_count() == 1:
      return self.raised
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return bool(np.any(multihost_utils.process_allgather(np.array(self.raised))))


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
  evaluators = create_evaluators(config)
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
  batches = pipeline.create_iterator(
      config.data, global_batch_size=config.batch_size,
      grid=config.data.image_size // MODEL_STRIDE, seed=config.seed, start_step=start_step,
      process_index=jax.process_index(), process_count=jax.process_count())

  # --- Durations, method, optimiser ----------------------------------------------------------
  total_steps, steps_per_epoch, warmup_steps = resolve_steps(config, batches.num_examples)
  logging.info("%d steps (%d per epoch of %d images).", total_steps, steps_per_epoch,
               batches.num_examples)
  method = methods_lib.create(config)
  lr_fn = optim.learning_rate_fn(config.optim, total_steps, warmup_steps)
  tx = optim.create_optimizer(config.optim, lr_fn)
  momentum_fn = functools.partial(
      ema.momentum_at, total_steps=total_steps, base=config.method.get("momentum", 0.0),
      schedule=config.method.get("momentum_schedule", "constant"))

  # --- State and checkpoint restore ----------------------------------------------------------
  state = checkpoint.restore_latest(manager, create_state(config, method, tx, mesh))
  if start_step:
    logging.info("Resumed from the checkpoint of step %d in %s.", start_step, workdir)
  writer.write_hparams({k: v for k, v in _flat(config.to_dict()).items()
                        if isinstance(v, (int, float, str, bool))})

  # --- The compiled step ---------------------------------------------------------------------
  step_fn = functools.partial(train_step, method=method, config=config, lr_fn=lr_fn,
                              momentum_fn=momentum_fn)
  state_sharding = jax.tree.map(lambda x: x.sharding, state)
  p_step = jax.jit(step_fn, in_shardings=(state_sharding, sharding.batch_sharded(mesh)),
                   out_shardings=(state_sharding, sharding.replicated(mesh)),
                   donate_argnums=(0,), compiler_options=xla_cpu.compiler_options())

  # --- Loop ----------------------------------------------------------------------------------
  history: list[tuple[int, dict[str, Any]]] = []
  pending: list[tuple[int, dict[str, Any]]] = []
  t_log, step_log = time.perf_counter(), start_step
  compile_s = None
  with _PreemptionFlag() as preempt, jax.set_mesh(mesh):
    for step in range(start_step, total_steps):
      batch = sharding.to_global(next(batches), mesh)
      t0 = time.perf_counter()
      state, metrics = p_step(state, batch)
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
      preempted = preempt.any_process()
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
        _run_evals(evaluators, state, done, writer, workdir)
      if preempted:
        manager.wait_until_finished()
        writer.flush()
        since = time.monotonic() - (preempt.received_at or time.monotonic())
        logging.warning("SIGTERM: saved the checkpoint of step %d %.1fs after the signal; exiting "
                        "with code %d so the launcher can requeue.", done, since,
                        PREEMPTED_EXIT_CODE)
        manager.close()
        raise Preempted(done)

  manager.wait_until_finished()
  manager.close()
  writer.flush()
  if jax.process_index() == 0 and models.family(config.model.name) == "resnet":
    _export_backbone(config.model.name, state, workdir)
  return state


def create_evaluators(config: Any) -> dict[str, Any]:
  """The evaluators of `config.evals` (built, so a bad entry fails before compiling)."""
  evals = config.evals.to_dict() if "evals" in config else {}
  if not evals:
    return {}
  from dense_ssl import evaluate  # pylint: disable=g-import-not-at-top
  try:
    return evaluate.from_config(evals, config.model.name)
  except ValueError as e:
    raise ValueError(f"config.evals: {e}") from None


def _local_copy(tree: Any) -> Any:
  """This process's copy of a replicated pytree, as host numpy (no other process involved)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def _run_evals(evaluators: dict[str, Any], state: TrainState, step: int, writer: Any,
               workdir: str) -> None:
  """Runs the evaluators on the online backbone in process 0; logs and writes eval_<step>.json."""
  if jax.process_index() != 0:
    return
  from dense_ssl.evaluate import runner  # pylint: disable=g-import-not-at-top
  variables = {"params": _local_copy(state.params), "batch_stats": _local_copy(state.batch_stats)}
  results = runner.run_timed(evaluators, variables)
  writer.write_scalars(step, {f"eval/{k}": v for k, v in results.items()})
  path = runner.write_results(workdir, step, results)
  logging.info("Evaluation at step %d (%s):\n%s", step, path, runner.format_table(results))


def _export_backbone(model_name: str, state: TrainState, workdir: str) -> None:
  """Writes the final backbone for detectron2 (.pkl) and, when torch is installed, torchvision.

  Reads the replicated state from this process's own device copy, so no other process (and no
  checkpoint read, which would need every process) is involved.
  """
  from dense_ssl import export  # pylint: disable=g-import-not-at-top
  params = _local_copy(state.params["backbone"])
  stats = _local_copy(state.batch_stats.get("online", {}).get("backbone", {}))
  formats = ["detectron2"]
  if importlib.util.find_spec("torch") is not None:
    formats.append("torchvision")
  else:
    logging.warning("torch is not installed: skipping the torchvision .pth export "
                    '(pip install "dense_ssl[torch]").')
  for fmt in formats:
    path = export.export(model_name, params, stats, fmt, export.default_output(workdir, fmt))
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
