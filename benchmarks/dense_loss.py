"""DenseCL's dense InfoNCE: materialised logits vs the chunked online log-sum-exp, time and memory.

    python benchmarks/dense_loss.py                                  # CPU default, a few minutes
    python benchmarks/dense_loss.py --batch=32,128,256 --repeats=5   # accelerator

The dense term scores every query cell (R = N·S² rows) against the whole dense queue (K rows,
65536 in the paper). `losses.info_nce_queue` materialises the (R, K) logits; with `chunk > 0`
`losses.dense_info_nce` visits the queue `chunk` rows at a time with an online log-sum-exp and a
custom VJP that recomputes each chunk. Both are timed here as DenseCL uses them: loss and the
gradient with respect to the queries (keys and queue are stop-gradient in the method), jitted.

Per (batch, chunk) the table gives the step time (median of interleaved rounds), XLA's temporary
buffer size for the compiled loss + gradient (`memory_analysis().temp_size_in_bytes`: the
memory the computation needs beyond its inputs and outputs, which is what grows with N·S²·K),
and the largest relative difference of loss and gradient from the materialised formula. The
last lines give, per batch, chunked/materialised ratios of time and of temporary memory.
No TensorFlow needed.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import functools  # pylint: disable=wrong-import-position
import time  # pylint: disable=wrong-import-position
from collections.abc import Sequence  # pylint: disable=wrong-import-position
from typing import Any  # pylint: disable=wrong-import-position

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from benchmarks import common  # pylint: disable=wrong-import-position
from dense_ssl import losses  # pylint: disable=wrong-import-position

COLUMNS = ("batch", "rows", "queue", "chunk", "ms", "spread", "compile s", "temp MB",
           "max rel diff")


def loss_and_grad(chunk: int, temperature: float):
  """jit(value_and_grad wrt q) of the materialised (`chunk` = 0) or the chunked loss."""
  if chunk > 0:
    fn = functools.partial(losses.dense_info_nce, temperature=temperature, chunk_size=chunk)
  else:
    fn = functools.partial(losses.info_nce_queue, temperature=temperature)
  return jax.jit(jax.value_and_grad(lambda q, k, queue: fn(q, k, queue)))


def inputs(rows: int, queue: int, dim: int, seed: int = 0) -> tuple[jax.Array, ...]:
  """Unit-norm queries, keys correlated with them (as positives are), and a unit-norm queue."""
  kq, kk, kqueue = jax.random.split(jax.random.key(seed), 3)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  q = unit(jax.random.normal(kq, (rows, dim)))
  k = unit(q + 0.5 * jax.random.normal(kk, (rows, dim)))
  return q, k, unit(jax.random.normal(kqueue, (queue, dim)))


def _rel_diff(a: Any, b: Any) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


class Case:
  """One compiled (batch, chunk) loss + gradient with its inputs, ready to be timed."""

  def __init__(self, batch: int, grid: int, queue: int, dim: int, chunk: int,
               temperature: float):
    self.batch, self.rows, self.queue, self.chunk = batch, batch * grid * grid, queue, chunk
    self.args = inputs(self.rows, queue, dim)
    fn = loss_and_grad(chunk, temperature)
    start = time.perf_counter()
    self.compiled = fn.lower(*self.args).compile()
    self.compile_s = time.perf_counter() - start
    self.temp_bytes = common.compiled_bytes(self.compiled, "temp")
    self.value = jax.block_until_ready(self.compiled(*self.args))  # also the warm-up call

  def run_round(self, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
      out = self.compiled(*self.args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / iters


def measure(batches: Sequence[int], chunks: Sequence[int], *, grid: int, queue: int, dim: int,
            temperature: float, repeats: int, iters: int) -> list[dict[str, Any]]:
  """Rows of the table, per batch: chunk 0 (materialised) first, then each chunk size."""
  rows = []
  for batch in batches:
    cases = {c: Case(batch, grid, queue, dim, c, temperature) for c in [0, *chunks]}
    times = common.interleave(
        {c: functools.partial(case.run_round, iters) for c, case in cases.items()}, repeats)
    ref_loss, ref_grad = cases[0].value
    for c, case in cases.items():
      loss, grad = case.value
      rows.append({
          "batch": batch, "rows": case.rows, "queue": queue, "chunk": c or "none",
          "ms": 1e3 * common.median(times[c]), "spread": common.spread(times[c]),
          "compile s": case.compile_s, "temp MB": case.temp_bytes / 2**20,
          "max rel diff": max(_rel_diff(loss, ref_loss), _rel_diff(grad, ref_grad)),
          "times": times[c], "temp": case.temp_bytes})
    del cases
  return rows


def ratio_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
  """Per batch and chunk: time and temporary-memory ratios to the materialised loss."""
  lines = []
  for base in (r for r in rows if r["chunk"] == "none"):
    for r in rows:
      if r["batch"] != base["batch"] or r["chunk"] == "none":
        continue
      paired = [t / b for t, b in zip(r["times"], base["times"])]
      lines.append(f"batch {r['batch']} ({r['rows']} rows x {r['queue']}): chunk {r['chunk']} / "
                   f"materialised: time {common.fmt(common.median(paired))}, temp memory "
                   f"{common.fmt(r['temp'] / base['temp'])} "
                   f"({common.fmt(r['temp'] / 2**20)} MB vs {common.fmt(base['temp'] / 2**20)} MB)")
  return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", default="8,32,64", help="comma list of images per step N")
  p.add_argument("--chunks", default="4096,16384", help="comma list of queue chunk sizes")
  p.add_argument("--grid", type=int, default=7, help="S, cells per side (7 at 224 px)")
  p.add_argument("--queue", type=int, default=65536, help="K, dense queue length")
  p.add_argument("--dim", type=int, default=128, help="embedding dim")
  p.add_argument("--temperature", type=float, default=0.2)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--iters", type=int, default=2)
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  args = parse_args(argv)
  print(common.machine_header(jax.devices()))
  print(f"# value_and_grad wrt q, float32, D={args.dim}, T={args.temperature}; "
        f"{args.repeats} interleaved rounds x {args.iters} calls after one warm-up call")
  rows = measure(common.parse_list(args.batch, int), common.parse_list(args.chunks, int),
                 grid=args.grid, queue=args.queue, dim=args.dim,
                 temperature=args.temperature, repeats=args.repeats, iters=args.iters)
  print(common.table(rows, COLUMNS))
  for line in ratio_lines(rows):
    print(line)
  return rows


if __name__ == "__main__":
  main()
