"""What DenseCL's and HoughCL's heads add to MoCo-v2's, timed without the backbone.

    python benchmarks/heads.py                       # batch 8, 7x7 C5 maps of 2048, queue 65536
    python benchmarks/heads.py --methods=mocov2,densecl,houghcl,houghcl_mirror,houghcl_v1

The step ratio DenseCL/MoCo-v2 of `step.py` divides a few hundred milliseconds of dense work
by a backbone step that, on a shared CPU, varies by 20-50% between rounds. Here the part that
differs is timed alone: from fixed query and key C5 maps, each method's neck on both views
(key side without gradient), its matcher, its losses against the queues (DenseCL's dense term
chunked as configured), the enqueue, and the gradient with respect to the neck parameters and
the query map (which flows on into the backbone). The table gives time per call, XLA's FLOPs
(counted with the dense logits materialised: XLA counts a scan body once) and the rate; the
last lines give each dense head's extra time and FLOPs over MoCo-v2's head and the step-time
ratio they predict for a MoCo-v2 step of `--step_ms` (e.g. from `step.py` on the same machine).
No TensorFlow needed.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import functools  # pylint: disable=wrong-import-position
from collections.abc import Callable, Sequence  # pylint: disable=wrong-import-position
from typing import Any  # pylint: disable=wrong-import-position

import jax  # pylint: disable=wrong-import-position

from benchmarks import common  # pylint: disable=wrong-import-position
from dense_ssl import queues, xla_cpu  # pylint: disable=wrong-import-position
from dense_ssl.methods import densecl, houghcl, mocov2  # pylint: disable=wrong-import-position
from dense_ssl.models import heads  # pylint: disable=wrong-import-position

COLUMNS = ("head", "batch", "ms", "spread", "GFLOP", "GFLOP/s")
# HoughCL's head is DenseCL's with its matcher: revision 2 (the default, METHODS.md §1b, with
# the mirrored family of bins as `houghcl_mirror`) or revision 1 (§1).
MATCHERS = {"densecl": densecl.argmax_matcher, "houghcl": houghcl.hough_v2_matcher,
            "houghcl_mirror": functools.partial(
                houghcl.hough_v2_matcher, params=houghcl.matchers.HoughParams(mirror=True)),
            "houghcl_v1": houghcl.hough_matcher}
TEMPERATURE = 0.2


def head_fn(method: str, neck: Any, chunk: int) -> Callable[..., Any]:
  """(params, q_map, k_map, queue, dense_queue) -> ((loss, new queues), grads wrt params, q_map)."""

  def loss(params, q_map, k_map, queue, dense_queue):
    q_out = neck.apply(params, q_map)
    k_out = jax.lax.stop_gradient(neck.apply(params, k_map))
    if method == "mocov2":
      value, aux = mocov2.head_loss(q_out, k_out, queue, TEMPERATURE)
      return value, aux["queue"]
    matcher = MATCHERS[method]
    value, aux = densecl.head_loss(q_map, q_out, k_map, k_out, queue, dense_queue,
                                   temperature=TEMPERATURE, loss_lambda=0.5, matcher=matcher,
                                   dense_chunk=chunk)
    return value, (aux["queue"], aux["dense_queue"])

  return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)


class Head:
  """One method's compiled head on fixed inputs."""

  def __init__(self, method: str, *, batch: int, grid: int, channels: int, hidden: int,
               dim: int, queue: int, chunk: int):
    self.method, self.batch = method, batch
    keys = jax.random.split(jax.random.key(0), 5)
    shape = (batch, grid, grid, channels)
    q_map, k_map = jax.random.normal(keys[0], shape), jax.random.normal(keys[1], shape)
    neck = (heads.MocoNeck(hidden=hidden, dim=dim) if method == "mocov2"
            else heads.DenseCLNeck(hidden=hidden, dim=dim))
    params = neck.init(keys[2], q_map)
    self.args = (params, q_map, k_map, queues.create(keys[3], queue, dim),
                 queues.create(keys[4], queue, dim))
    self.compiled = jax.jit(head_fn(method, neck, chunk),
                            compiler_options=xla_cpu.compiler_options()).lower(
                                *self.args).compile()
    self.flops = common.lowered_flops(jax.jit(head_fn(method, neck, 0)).lower(*self.args))
    jax.block_until_ready(self.compiled(*self.args))  # warm-up

  def run_round(self, iters: int) -> float:
    with common.Stopwatch() as watch:
      for _ in range(iters):
        out = self.compiled(*self.args)
      jax.block_until_ready(out)
    return watch.seconds / iters


def measure(methods: Sequence[str], *, repeats: int, iters: int,
            **sizes: int) -> list[dict[str, Any]]:
  cases = {m: Head(m, **sizes) for m in methods}
  times = common.interleave(
      {m: functools.partial(h.run_round, iters) for m, h in cases.items()}, repeats)
  rows = []
  for m, h in cases.items():
    sec = common.median(times[m])
    rows.append({"head": m, "batch": h.batch, "ms": 1e3 * sec, "spread": common.spread(times[m]),
                 "GFLOP": h.flops / 1e9, "GFLOP/s": h.flops / 1e9 / sec, "times": times[m],
                 "flops": h.flops})
  return rows


def extra_lines(rows: Sequence[dict[str, Any]], step_ms: float) -> list[str]:
  """Each dense head's extra time and FLOPs over MoCo-v2's head (paired medians)."""
  base = next(r for r in rows if r["head"] == "mocov2")
  lines = []
  for r in rows:
    if r is base:
      continue
    extra = common.median([t - b for t, b in zip(r["times"], base["times"])])
    flops = r["flops"] - base["flops"]
    line = (f"{r['head']} head - mocov2 head: {common.fmt(1e3 * extra)} ms, "
            f"{common.fmt(flops / 1e9)} GFLOP ({common.fmt(flops / 1e9 / extra)} GFLOP/s)")
    if step_ms > 0:
      line += (f"; with a {common.fmt(step_ms)} ms MoCo-v2 step: step ratio "
               f"{common.fmt(1.0 + 1e3 * extra / step_ms)}")
    lines.append(line)
  dense = next((r for r in rows if r["head"] == "densecl"), None)
  for r in rows if dense is not None else ():
    if r["head"].startswith("houghcl"):  # the matcher's own cost: the heads differ only there
      extra = common.median([t - b for t, b in zip(r["times"], dense["times"])])
      lines.append(f"{r['head']} matcher - densecl argmax: {common.fmt(1e3 * extra)} ms, "
                   f"{common.fmt((r['flops'] - dense['flops']) / 1e9)} GFLOP")
  return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--methods", default="mocov2,densecl,houghcl")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--grid", type=int, default=7, help="S, C5 cells per side (7 at 224 px)")
  p.add_argument("--channels", type=int, default=2048, help="C5 channels (2048: ResNet-50)")
  p.add_argument("--hidden", type=int, default=2048)
  p.add_argument("--dim", type=int, default=128)
  p.add_argument("--queue", type=int, default=65536)
  p.add_argument("--chunk", type=int, default=4096, help="method.dense_chunk (0 materialises)")
  p.add_argument("--step_ms", type=float, default=0.0,
                 help="a MoCo-v2 step time to turn the extra time into a step ratio")
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--iters", type=int, default=1)
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  args = parse_args(argv)
  methods = common.parse_list(args.methods)
  if "mocov2" not in methods:
    raise SystemExit("--methods must include mocov2: the extras are measured against it.")
  print(common.machine_header(jax.devices()))
  print(f"# heads on fixed {args.grid}x{args.grid}x{args.channels} C5 maps, batch {args.batch}, "
        f"hidden {args.hidden}, dim {args.dim}, queue {args.queue}, dense_chunk {args.chunk}; "
        f"{args.repeats} interleaved rounds x {args.iters} calls")
  rows = measure(methods, repeats=args.repeats, iters=args.iters, batch=args.batch,
                 grid=args.grid, channels=args.channels, hidden=args.hidden, dim=args.dim,
                 queue=args.queue, chunk=args.chunk)
  print(common.table(rows, COLUMNS))
  for line in extra_lines(rows, args.step_ms):
    print(line)
  return rows


if __name__ == "__main__":
  main()
