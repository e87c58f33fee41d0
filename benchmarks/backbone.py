"""Backbone forward and forward + backward time: XLA's defaults vs this codebase's CPU choices.

    python benchmarks/backbone.py                       # ResNet-18/96 b64 and ResNet-50/224 b8

Two things make ResNets fast on CPU here: the compiler options of `dense_ssl.xla_cpu`
(convolutions by XLA's own kernels instead of YNNPACK) and `dense_ssl.models.conv` (1x1 weight
gradients as matrix products, max-pooling's gradient as a first-max tap scatter; CPU only).
This script times a ResNet's jitted forward and forward + backward (train-mode BatchNorm, a
sum-of-squares loss on C5) three ways in the same run, interleaved: XLA's defaults with XLA's
own gradients (`lax.conv_general_dilated`, `flax.linen.max_pool`), the options alone, and both
("ours"), and prints the ratios. No TensorFlow needed; on GPU/TPU all three lower to XLA's own
operations with no options.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import functools  # pylint: disable=wrong-import-position
from collections.abc import Sequence  # pylint: disable=wrong-import-position
from typing import Any  # pylint: disable=wrong-import-position

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position

from benchmarks import common  # pylint: disable=wrong-import-position
from dense_ssl import models, xla_cpu  # pylint: disable=wrong-import-position

COLUMNS = ("model", "size", "batch", "variant", "fwd ms", "fwd+bwd ms", "bwd/fwd", "spread")


# variant -> (compiler options of dense_ssl.xla_cpu, models/conv.py's gradients)
VARIANTS = {"XLA's defaults": (False, False), "options": (True, False), "ours": (True, True)}


class Backbone:
  """Compiled forward and forward + backward of one backbone on a fixed batch."""

  def __init__(self, model: str, size: int, batch: int, variant: str):
    self.model, self.size, self.batch, self.variant = model, size, batch, variant
    options, ours = VARIANTS[variant]
    net = models.get_backbone(model, cpu_kernels=ours)
    x = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
    variables = net.init(jax.random.key(1), x)
    stats = variables["batch_stats"]

    def features(params, images):
      y, _ = net.apply({"params": params, "batch_stats": stats}, images, mutable=["batch_stats"])
      return y

    loss = lambda params, images: jnp.mean(features(params, images) ** 2)
    opts = xla_cpu.compiler_options() if options else None
    self.fwd = jax.jit(features, compiler_options=opts).lower(variables["params"], x).compile()
    self.grad = jax.jit(jax.grad(loss), compiler_options=opts).lower(
        variables["params"], x).compile()
    self.args = (variables["params"], x)
    for fn in (self.fwd, self.grad):  # warm-up
      jax.block_until_ready(fn(*self.args))

  def run_round(self, fn: Any) -> float:
    with common.Stopwatch() as watch:
      jax.block_until_ready(fn(*self.args))
    return watch.seconds


def measure(model: str, size: int, batch: int, repeats: int) -> list[dict[str, Any]]:
  runs = {v: Backbone(model, size, batch, v) for v in VARIANTS}
  rounds = {}
  for v, b in runs.items():
    rounds[("fwd", v)] = functools.partial(b.run_round, b.fwd)
    rounds[("grad", v)] = functools.partial(b.run_round, b.grad)
  times = common.interleave(rounds, repeats)
  rows = []
  for v in VARIANTS:
    fwd, grad = common.median(times["fwd", v]), common.median(times["grad", v])
    rows.append({"model": model, "size": size, "batch": batch, "variant": v,
                 "fwd ms": 1e3 * fwd, "fwd+bwd ms": 1e3 * grad,
                 "bwd/fwd": (grad - fwd) / fwd, "spread": common.spread(times["grad", v]),
                 "times": {"fwd": times["fwd", v], "grad": times["grad", v]}})
  return rows


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--specs", default="resnet18/96/64,resnet50/224/8",
                 help="comma list of model/size/batch")
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args(argv)
  print(common.machine_header(jax.devices()))
  rows = []
  for spec in common.parse_list(args.specs):
    model, size, batch = spec.split("/")
    rows.extend(measure(model, int(size), int(batch), args.repeats))
  print(common.table(rows, COLUMNS))
  n = len(VARIANTS)
  for group in (rows[i:i + n] for i in range(0, len(rows), n)):
    base = group[0]
    for row in group[1:]:
      for part, label in (("fwd", "fwd"), ("grad", "fwd+bwd")):
        paired = [a / b for a, b in zip(base["times"][part], row["times"][part])]
        print(f"{row['model']}/{row['size']} batch {row['batch']}: {label} time, "
              f"{base['variant']} / {row['variant']} = {common.fmt(common.median(paired))}")
  return rows


if __name__ == "__main__":
  main()
