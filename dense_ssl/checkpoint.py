"""Checkpoints with orbax: keep-N, periodic and preemption saves, automatic resume.

Orbax writes each checkpoint into a temporary directory and renames it only once complete, so a
crash during a save leaves the previous checkpoint as the latest one (never a half-written one).
The state is saved as a plain nested dict (`flax.serialization.to_state_dict`), which keeps the
files readable without this codebase's classes (`load_backbone` relies on that).

A checkpoint loads on any topology: resuming restores into the new mesh's shardings, and
`load_raw` (export, evaluation, pictures) restores every array onto this process's first
device, whatever device count or process count wrote it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

CONFIG_FILE = "config.json"


def _directory(workdir: str) -> epath.Path:
  path = epath.Path(workdir)
  if not str(workdir).startswith("gs://"):
    path = epath.Path(os.path.abspath(workdir))
  return path / "checkpoints"


def create_manager(workdir: str, *, keep: int, every_steps: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every_steps,
                                         create=True, enable_async_checkpointing=True)
  return ocp.CheckpointManager(_directory(workdir), options=options)


def save(manager: ocp.CheckpointManager, state: Any, *, force: bool = False) -> bool:
  """Saves `state` at its step (when due, or always with `force`); returns whether it saved."""
  step = int(jax.device_get(state.step))
  return manager.save(step, args=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
                      force=force)


def restore_latest(manager: ocp.CheckpointManager, state: Any) -> Any:
  """Returns `state` restored from the newest checkpoint (same shardings), or `state` if none."""
  step = manager.latest_step()
  if step is None:
    return state
  template = flax.serialization.to_state_dict(state)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
  restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  return flax.serialization.from_state_dict(state, restored)


def _reader(workdir: str) -> ocp.CheckpointManager:
  # With its handler named, the manager can read the saved tree's metadata before restoring.
  return ocp.CheckpointManager(_directory(workdir), item_handlers=ocp.StandardCheckpointHandler())


def saved_steps(workdir: str) -> list[int]:
  """The steps of a run's checkpoints, oldest first ([] when it has none)."""
  if not _directory(workdir).exists():
    return []
  manager = _reader(workdir)
  steps = sorted(manager.all_steps())
  manager.close()
  return steps


def save_config(workdir: str, config: Any) -> None:
  """Writes the resolved config next to the checkpoints (export and evaluation read it)."""
  path = epath.Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  (path / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2))


def load_config_dict(workdir: str) -> dict[str, Any]:
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"No {CONFIG_FILE} in {workdir}: is this the --workdir of a dense_ssl "
                            "training run?")
  return json.loads(path.read_text())


def load_raw(workdir: str, step: int | None = None) -> tuple[int, dict[str, Any]]:
  """Restores a checkpoint as plain numpy nested dicts, without knowing the model.

  The arrays are read onto this process's first device (the checkpoint's own shardings name
  devices that need not exist here), then copied to the host.
  """
  manager = _reader(workdir)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"No checkpoint under {_directory(workdir)}; train first with "
                            f"python -m dense_ssl.main --workdir={workdir}.")
  here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  metadata = manager.item_metadata(step)
  metadata = getattr(metadata, "tree", metadata)
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
                          metadata)
  tree = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  manager.close()
  return step, jax.tree.map(_to_numpy, tree)


def _to_numpy(x: Any) -> np.ndarray:
  if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)  # typed PRNG keys have no numpy form; keep their raw bits
  return np.asarray(x)


def load_config(workdir: str) -> Any:
  """The run's config (config.json) as an ml_collections ConfigDict."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(load_config_dict(workdir))


def load_method(workdir: str) -> Any:
  """The run's method, rebuilt from its config (it knows where its backbone lives)."""
  from dense_ssl import methods  # pylint: disable=g-import-not-at-top
  return methods.create(load_config(workdir))


def load_backbone(workdir: str, step: int | None = None) -> tuple[int, Any, dict[str, Any]]:
  """(step, Backbone, {"params", "batch_stats"}) of the online backbone of a run's checkpoint.

  The method of the run says where its backbone is (`Method.backbone_variables`), so this
  works for every method, ResNet or ViT, and on any device count.
  """
  method = load_method(workdir)
  step, tree = load_raw(workdir, step)
  return step, method.backbone, method.backbone_variables(tree["params"], tree["batch_stats"])


def all_finite(tree: Any) -> bool:
  leaves = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]
  return all(np.all(np.isfinite(x)) for x in leaves if np.issubdtype(x.dtype, np.floating))


