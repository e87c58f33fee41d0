"""What sparse and small inputs cost a ViT: DILEMMA's student and DINO's local crops.

    python benchmarks/vit.py                        # CPU default: ViT-S/16, batch 8, float32
    python benchmarks/vit.py --batch=128 --dtype=bfloat16 --repeats=5 --iters=10   # accelerator

Three comparisons, each timed in interleaved rounds (A B A B ...) with XLA's FLOP count of the
same compiled function, after a warm-up call:

* `student`: the ViT's forward + backward (gradient of a fixed random projection of every
  output token with respect to all parameters) on `--size` px images, dense (all L patch
  tokens) vs DILEMMA's sparse student (K = floor(L·(1 - drop)) tokens kept, a fifth of them
  with wrong positions, exactly as `dilemma.corruption` draws them). Target: <= 0.35 at 25 %.
* `mocov3 step`: MoCo v3's whole loss + gradient (both views: the dense momentum encoder, the
  online encoder with projector and predictor) without and with DILEMMA (the momentum
  encoder's forward stays dense, so the step saves less than the student).
* `dino local`: the ViT's forward + backward on a `--local_size` px crop vs a `--size` px crop
  (DINO's 96 vs 224: 37 vs 197 tokens).

Each line reports ms per call (median over rounds), the rounds' spread, GFLOP per call, and
the ratios next to the token ratio. No TensorFlow needed.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import time  # pylint: disable=wrong-import-position
from collections.abc import Callable, Sequence  # pylint: disable=wrong-import-position
from typing import Any  # pylint: disable=wrong-import-position

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from benchmarks import common  # pylint: disable=wrong-import-position
from dense_ssl import models, xla_cpu  # pylint: disable=wrong-import-position
from dense_ssl import methods as methods_lib  # pylint: disable=wrong-import-position
from dense_ssl.methods import dilemma  # pylint: disable=wrong-import-position

COLUMNS = ("case", "tokens", "ms", "spread", "GFLOP", "GFLOP/s")


class Timed:
  """A compiled function on fixed arguments: its FLOPs, and `round()` timing `iters` calls."""

  def __init__(self, name: str, tokens: int, fn: Callable[..., Any], args: Sequence[Any],
               iters: int):
    self.name, self.tokens, self.iters, self.args = name, tokens, iters, args
    lowered = jax.jit(fn, compiler_options=xla_cpu.compiler_options()).lower(*args)
    self.flops = common.lowered_flops(lowered)
    self.compiled = lowered.compile()
    jax.block_until_ready(self.compiled(*args))  # warm-up

  def round(self) -> float:
    start = time.perf_counter()
    for _ in range(self.iters):
      out = self.compiled(*self.args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / self.iters


def backbone_grad(module: Any, sparse: bool) -> Callable[..., Any]:
  """(params, x, weights, keep_idx, pos_idx) -> gradients of Σ tokens·weights."""

  def loss(params, x, weights, keep_idx, pos_idx):
    kwargs = dict(keep_idx=keep_idx, pos_idx=pos_idx) if sparse else {}
    tokens = module.apply({"params": params}, x, **kwargs)
    return jnp.sum(tokens.astype(jnp.float32) * weights)

  return jax.grad(loss)


def student_cases(args: argparse.Namespace, dtype: Any) -> list[Timed]:
  module = models.get_backbone(args.model, dtype=dtype)
  stride = models.stride(args.model)
  num_tokens = (args.size // stride) ** 2
  x = jax.random.normal(jax.random.key(0), (args.batch, args.size, args.size, 3))
  params = jax.jit(module.init)(jax.random.key(1), x)["params"]
  draw = dilemma.corruption(jax.random.key(2), args.batch, num_tokens,
                            dilemma.Options(enabled=True, drop_rate=args.drop))
  keep = draw["keep_idx"].shape[1]
  width = models.num_features(args.model)
  out = []
  for sparse, tokens in ((False, num_tokens), (True, keep)):
    weights = jax.random.normal(jax.random.key(3), (args.batch, 1 + tokens, width))
    out.append(Timed(f"student {'DILEMMA' if sparse else 'dense'}", 1 + tokens,
                     backbone_grad(module, sparse),
                     (params, x, weights, draw["keep_idx"], draw["pos_idx"]), args.iters))
  local = args.local_size
  xl = jax.random.normal(jax.random.key(4), (args.batch, local, local, 3))
  local_tokens = (local // stride) ** 2
  weights = jax.random.normal(jax.random.key(5), (args.batch, 1 + local_tokens, width))
  out.append(Timed(f"dino local {local} px", 1 + local_tokens, backbone_grad(module, False),
                   (params, xl, weights, None, None), args.iters))
  return out


def mocov3_config() -> common.AttrDict:
  """configs/mocov3.py's recipe; without ml_collections (accelerator machines), the keys the
  method reads, with the recipe's values."""
  try:
    import importlib  # pylint: disable=g-import-not-at-top
    return common.AttrDict(importlib.import_module("configs.mocov3").get_config().to_dict())
  except ModuleNotFoundError as error:
    if error.name != "ml_collections":
      raise
  return common.AttrDict(
      model=dict(name="vit_s16", half_precision=False, pos_embed="sincos"),
      data=dict(image_size=224, crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), flip=True),
      method=dict(name="mocov3", module="", temperature=0.2, momentum=0.99,
                  momentum_schedule="cosine", dim=256, hidden=4096, bn="sync", bn_groups=1,
                  dilemma=dict(enabled=False, drop_rate=0.75, probability=0.2, lam=1.0)))


def mocov3_cases(args: argparse.Namespace) -> list[Timed]:
  out = []
  for enabled in (False, True):
    config = mocov3_config()
    config.model.name, config.model.half_precision = args.model, args.dtype == "bfloat16"
    config.data.image_size, config.batch_size = args.size, args.batch
    config.method.dilemma.enabled, config.method.dilemma.drop_rate = enabled, args.drop
    method = methods_lib.create(config)
    batch = {v: jax.random.normal(jax.random.key(i), (args.batch, args.size, args.size, 3))
             for i, v in enumerate(("view1", "view2"))}
    variables = jax.jit(method.init)(jax.random.key(7), batch)
    state = methods_lib.MethodState(step=jnp.zeros((), jnp.int32),
                                    target_params=variables["target_params"],
                                    batch_stats=variables["batch_stats"],
                                    extra=variables["extra"])
    grad = jax.grad(lambda p, s, b, r: method.loss(p, s, b, r)[0])
    out.append(Timed(f"mocov3 step{' + DILEMMA' if enabled else ''}", 0, grad,
                     (variables["params"], state, batch, jax.random.key(8)), args.iters))
  return out


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="vit_s16")
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--local_size", type=int, default=96)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--drop", type=float, default=0.75)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--iters", type=int, default=2)
  parser.add_argument("--no_step", action="store_true", help="skip the MoCo v3 step pair")
  args = parser.parse_args(argv)

  print(common.machine_header(jax.devices()))
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  cases = student_cases(args, dtype) + ([] if args.no_step else mocov3_cases(args))
  times = common.interleave({c.name: c.round for c in cases}, args.repeats)
  rows = []
  for c in cases:
    ms = common.median(times[c.name]) * 1e3
    rows.append({"case": c.name, "tokens": c.tokens or "", "ms": ms,
                 "spread": common.spread(times[c.name]), "GFLOP": c.flops / 1e9,
                 "GFLOP/s": c.flops / 1e6 / ms})
  print(f"{args.model}/{args.size} {args.dtype} batch {args.batch}, drop {args.drop}, "
        f"{args.repeats} rounds of {args.iters} calls")
  print(common.table(rows, COLUMNS))

  by_name = {c.name: c for c in cases}
  ratio = lambda a, b: common.median([x / y for x, y in zip(times[a], times[b])])
  results = {}
  pairs = [("student DILEMMA", "student dense", "DILEMMA/dense student fwd+bwd"),
           (f"dino local {args.local_size} px", "student dense",
            f"DINO local/global crop fwd+bwd ({args.local_size}/{args.size} px)")]
  if not args.no_step:
    pairs.append(("mocov3 step + DILEMMA", "mocov3 step", "MoCo v3 + DILEMMA / MoCo v3 step"))
  for a, b, label in pairs:
    time_ratio = ratio(a, b)
    flop_ratio = by_name[a].flops / by_name[b].flops
    token = (f", tokens {by_name[a].tokens / by_name[b].tokens:.3f}"
             if by_name[a].tokens and by_name[b].tokens else "")
    print(f"{label}: time {time_ratio:.3f}, XLA FLOPs {flop_ratio:.3f}{token}")
    results[label] = time_ratio
  return results


if __name__ == "__main__":
  main()
