"""Device mesh and shardings.

One mesh axis, "data": the batch is split over every device of every process, and the state is
replicated. We create the mesh with `AxisType.Auto` (classic sharding propagation) rather than
jax 0.10's default `AxisType.Explicit`: the methods index and gather on the batch axis (queue
writes, argmax matches, shuffle-BN permutations), and under Explicit axes each of those would need
an `out_sharding` annotation inside method code, which should not know about meshes at all.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P


def create_mesh() -> Mesh:
  """A 1-D data-parallel mesh over all devices of all processes."""
  return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def to_global(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's slice of the batch into global arrays sharded over "data"."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
  n = mesh.shape["data"]
  if global_batch % n:
    raise ValueError(f"config.batch_size={global_batch} is not divisible by the {n} devices of "
                     f"the mesh; use a multiple of {n}.")


def replicate(tree: Any, mesh: Mesh) -> Any:
  return jax.device_put(tree, replicated(mesh))
