"""Backbone forward and forward + backward time, with `models/conv.py`'s CPU gradients vs XLA's.

    python benchmarks/backbone.py                       # ResNet-18/96 b64 and ResNet-50/224 b8

`dense_ssl.models.conv` replaces, when lowering for CPU only, the weight gradients of 1x1, stem
and 64-channel 3x3 convolutions by matrix products and max-pooling's gradient by a first-max
tap scatter. This script times a ResNet's jitted forward and forward + backward (train-mode
BatchNorm, a sum-of-squares loss on C5) twice in the same run, interleaved: with those
gradients ("ours") and with XLA's own (`lax.conv_general_dilated`, `flax.linen.max_pool`), and
prints the ratio. No TensorFlow needed; on GPU/TPU both variants lower to XLA's own operations.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import contextlib  # pylint: disable=wrong-import-position
import functools  # pylint: disable=wrong-import-position
from collections.abc import Iterator, Sequence  # pylint: disable=wrong-import-position
from typing import Any  # pylint: disable=wrong-import-position

import flax.linen as nn  # pylint: disable=wrong-import-position
import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
from jax import lax  # pylint: disable=wrong-import-position

from benchmarks import common  # pylint: disable=wrong-import-position
from dense_ssl import models  # pylint: disable=wrong-import-position
from dense_ssl.models import conv  # pylint: disable=wrong-import-position

COLUMNS = ("model", "size", "batch", "gradients", "fwd ms", "fwd+bwd ms", "bwd/fwd", "spread")


@contextlib.contextmanager
def xla_gradients() -> Iterator[None]:
  """Traces ResNets with XLA's own convolution and max-pool gradients (for comparison)."""
  saved = conv.conv_general_dilated, conv.max_pool
  conv.conv_general_dilated = lax.conv_general_dilated
  conv.max_pool = lambda x, window, strides, padding: nn.max_pool(
      x, window, strides=strides, padding=padding)
  try:
    yield
  finally:
    conv.conv_general_dilated, conv.max_pool = saved


class Backbone:
  """Compiled forward and forward + backward of one backbone on a fixed batch."""

  def __init__(self, model: str, size: int, batch: int, ours: bool):
    self.model, self.size, self.batch, self.ours = model, size, batch, ours
    net = models.get_backbone(model)
    x = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
    variables = net.init(jax.random.key(1), x)
    stats = variables["batch_stats"]

    def features(params, images):
      y, _ = net.apply({"params": params, "batch_stats": stats}, images, mutable=["batch_stats"])
      return y

    loss = lambda params, images: jnp.mean(features(params, images) ** 2)
    with contextlib.nullcontext() if ours else xla_gradients():
      self.fwd = jax.jit(features).lower(variables["params"], x).compile()
      self.grad = jax.jit(jax.grad(loss)).lower(variables["params"], x).compile()
    self.args = (variables["params"], x)
    for fn in (self.fwd, self.grad):  # warm-up
      jax.block_until_ready(fn(*self.args))

  def run_round(self, fn: Any) -> float:
    with common.Stopwatch() as watch:
      jax.block_until_ready(fn(*self.args))
    return watch.seconds


def measure(model: str, size: int, batch: int, repeats: int) -> list[dict[str, Any]]:
  runs = {ours: Backbone(model, size, batch, ours) for ours in (False, True)}
  rounds = {}
  for ours, b in runs.items():
    rounds[("fwd", ours)] = functools.partial(b.run_round, b.fwd)
    rounds[("grad", ours)] = functools.partial(b.run_round, b.grad)
  times = common.interleave(rounds, repeats)
  rows = []
  for ours in (False, True):
    fwd, grad = common.median(times["fwd", ours]), common.median(times["grad", ours])
    rows.append({"model": model, "size": size, "batch": batch,
                 "gradients": "ours (CPU)" if ours else "XLA's own",
                 "fwd ms": 1e3 * fwd, "fwd+bwd ms": 1e3 * grad,
                 "bwd/fwd": (grad - fwd) / fwd, "spread": common.spread(times["grad", ours]),
                 "grad_times": times["grad", ours]})
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
  for xla, ours in zip(rows[::2], rows[1::2]):
    paired = [a / b for a, b in zip(xla["grad_times"], ours["grad_times"])]
    print(f"{ours['model']}/{ours['size']} batch {ours['batch']}: fwd+bwd with XLA's own "
          f"gradients / ours = {common.fmt(common.median(paired))}")
  return rows


if __name__ == "__main__":
  main()
