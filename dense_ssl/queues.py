"""A fixed-size ring buffer of negative keys (MoCo/DenseCL queues) as a pure pytree.

The queue lives in the train state (`state.extra`), so it is checkpointed, sharded and donated
like any other array. `enqueue` returns a new queue; nothing is mutated.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Queue:
  """K rows of D-dim keys; row j is entry j. `ptr` is the next row to overwrite."""
  buffer: jax.Array  # (K, D) float32
  ptr: jax.Array  # () int32


def create(rng: jax.Array, size: int, dim: int) -> Queue:
  """A queue of `size` L2-normalised Gaussian rows (the official initial queue), pointer 0."""
  if size < 1 or dim < 1:
    raise ValueError(f"Queue size and dim must be positive, got size={size}, dim={dim}.")
  rows = jax.random.normal(rng, (size, dim), jnp.float32)
  rows = rows / jnp.linalg.norm(rows, axis=-1, keepdims=True)
  return Queue(buffer=rows, ptr=jnp.zeros((), jnp.int32))


def enqueue(queue: Queue, keys: jax.Array) -> Queue:
  """Writes the (N, D) `keys` at the pointer and advances it by N (mod K).

  Requires K % N == 0 (as the official code asserts), so a write never straddles the end of
  the buffer and a single `dynamic_update_slice` suffices: no gather/scatter, and rows outside
  [ptr, ptr+N) stay bit-identical. Keys are stop-gradient'ed: the queue holds constants.
  """
  size, dim = queue.buffer.shape
  if keys.ndim != 2 or keys.shape[1] != dim:
    raise ValueError(f"Keys of shape {keys.shape} cannot enter a queue of {size} x {dim}; "
                     f"pass an (N, {dim}) array.")
  n = keys.shape[0]
  if n == 0 or size % n:
    raise ValueError(f"Queue size {size} is not a multiple of the {n} keys enqueued per step; "
                     f"choose a queue size divisible by the global batch size.")
  keys = jax.lax.stop_gradient(keys).astype(queue.buffer.dtype)
  buffer = jax.lax.dynamic_update_slice(queue.buffer, keys, (queue.ptr, jnp.zeros((), jnp.int32)))
  return Queue(buffer=buffer, ptr=((queue.ptr + n) % size).astype(jnp.int32))
