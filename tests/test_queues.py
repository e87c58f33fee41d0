"""Tests for dense_ssl.queues: the ring buffer of negatives."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dense_ssl import queues


def test_create_gives_unit_rows_and_zero_pointer():
  q = queues.create(jax.random.key(0), 12, 5)
  assert q.buffer.shape == (12, 5) and q.buffer.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(q.buffer, axis=1), 1.0, rtol=1e-6)
  assert q.ptr.dtype == jnp.int32 and int(q.ptr) == 0
  other = queues.create(jax.random.key(1), 12, 5)
  assert not np.allclose(q.buffer, other.buffer)


def test_enqueue_writes_at_pointer_and_keeps_other_rows_bit_identical():
  q = queues.create(jax.random.key(0), 12, 3)
  keys = jax.random.normal(jax.random.key(1), (4, 3))
  enqueue = jax.jit(queues.enqueue)
  expected_ptrs = [4, 8, 0, 4]  # K = 12, N = 4: wraps after three writes
  for step, expected in enumerate(expected_ptrs):
    start = int(q.ptr)
    new = enqueue(q, keys + step)
    np.testing.assert_array_equal(new.buffer[start:start + 4], keys + step)
    untouched = np.ones(12, bool)
    untouched[start:start + 4] = False
    np.testing.assert_array_equal(np.asarray(new.buffer)[untouched],
                                  np.asarray(q.buffer)[untouched])
    assert int(new.ptr) == expected and new.ptr.dtype == jnp.int32
    q = new


def test_enqueue_casts_keys_to_the_buffer_dtype():
  q = queues.create(jax.random.key(0), 8, 4)
  new = queues.enqueue(q, jnp.ones((2, 4), jnp.bfloat16))
  assert new.buffer.dtype == jnp.float32
  np.testing.assert_array_equal(new.buffer[:2], 1.0)


def test_enqueue_blocks_gradients_to_the_keys():
  q = queues.create(jax.random.key(0), 8, 4)
  keys = jax.random.normal(jax.random.key(1), (4, 4))
  grad = jax.grad(lambda k: jnp.sum(queues.enqueue(q, k).buffer ** 2))(keys)
  np.testing.assert_array_equal(grad, 0.0)


def test_enqueue_rejects_a_batch_that_does_not_divide_the_queue():
  q = queues.create(jax.random.key(0), 10, 4)
  with pytest.raises(ValueError, match="not a multiple"):
    queues.enqueue(q, jnp.ones((4, 4)))
  with pytest.raises(ValueError, match=r"\(N, 4\)"):
    queues.enqueue(q, jnp.ones((5, 3)))


def test_queue_is_a_pytree():
  q = queues.create(jax.random.key(0), 8, 4)
  leaves = jax.tree.leaves(q)
  assert len(leaves) == 2
  doubled = jax.tree.map(lambda x: x * 2, q)
  assert isinstance(doubled, queues.Queue)
