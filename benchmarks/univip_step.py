"""UniVIP's step against BYOL's and MoCo-v2's: time, XLA FLOPs, and the share of Sinkhorn.

    python benchmarks/univip_step.py                                  # CPU: ResNet-18, batch 8
    python benchmarks/univip_step.py --model=resnet50 --batch=64 --dtype=bfloat16   # accelerator

Each method's own `dense_ssl.train.train_step` is built by `train.build` from its paper recipe
(configs/<method>.py at the benchmarked sizes: scenes at `--size`, UniVIP's K = 4 instances at
`--instance_size`), compiled as the trainer compiles it, and timed in interleaved rounds on a
synthetic batch that lives on the device (benchmarks/step.py's `JaxStep`). FLOPs are XLA's cost
analysis of the lowered step. Then the instance-instance term alone: the Sinkhorn plan on the
batch's (B, K, K) costs, and the whole OT loss with its gradient on (B, K, D) embeddings, each
timed and counted the same way, as a share of UniVIP's step.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from benchmarks import common, step  # pylint: disable=wrong-import-position

METHODS = ("mocov2", "byol", "univip")
LABELS = {"mocov2": "MoCo-v2", "byol": "BYOL", "univip": "UniVIP"}


@dataclasses.dataclass(frozen=True)
class Spec:
  """What `step.JaxStep` reads of a spec, for the BYOL family's recipes."""
  method: str
  model: str = "resnet18"
  size: int = 224
  instance_size: int = 96
  batch: int = 8
  dtype: str = "float32"
  devices: int = 1
  dense_chunk: int = 0  # MoCo-v2 has no dense loss: nothing to re-lower

  @property
  def label(self) -> str:
    return (f"{self.model}/{self.size} (instances {self.instance_size}) {self.dtype} batch "
            f"{self.batch} on {self.devices} device{'s' if self.devices > 1 else ''}")

  def config(self) -> common.AttrDict:
    # MoCo-v2 keeps its recipe's shuffle-BN (groups fitted to the batch); BYOL/UniVIP sync BN.
    groups = common.fit_bn_groups(8, self.batch, self.devices)
    c = common.bench_config(self.method, model=self.model, image_size=self.size,
                            batch=self.batch, half_precision=self.dtype == "bfloat16",
                            queue=65536 if self.batch <= 65536 else None,
                            bn_groups=groups if self.method == "mocov2" else None)
    if self.method == "univip":
      c.method.instance_size = self.instance_size
    return c


def instance_term_seconds(batch: int, k: int, dim: int, *, repeats: int,
                          iters: int) -> dict[str, float]:
  """Seconds and FLOPs of the Sinkhorn plan and of the whole OT loss + gradient."""
  from dense_ssl import matchers  # pylint: disable=g-import-not-at-top
  from dense_ssl.methods import univip  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  o, t = (jnp.asarray(rng.normal(size=(batch, k, dim)), jnp.float32) for _ in range(2))
  cost = jnp.asarray(rng.uniform(0, 2, (batch, k, k)), jnp.float32)
  marg = jnp.full((batch, k), 1.0 / k, jnp.float32)
  plan_fn = jax.jit(functools.partial(matchers.sinkhorn, eps=0.1, n_iter=50))

  def ot(o, t):
    return univip.ot_instance_loss(o, t, marg, marg, byol_form=True)[0]

  ot_fn = jax.jit(jax.value_and_grad(ot))
  out = {}
  for name, fn, args in (("sinkhorn", plan_fn, (cost, marg, marg)), ("ot_loss", ot_fn, (o, t))):
    lowered = fn.lower(*args)
    compiled = lowered.compile()
    jax.block_until_ready(compiled(*args))

    def one_round(compiled=compiled, args=args) -> float:
      with common.Stopwatch() as watch:
        for _ in range(iters):
          res = compiled(*args)
        jax.block_until_ready(res)
      return watch.seconds

    times = common.interleave({name: one_round}, repeats)[name]
    # XLA counts a loop body once: the 50 Sinkhorn iterations are counted as one.
    out[f"{name}_s"] = common.median(times) / iters
    out[f"{name}_flops"] = common.lowered_flops(lowered)
  return out


def step_flops(spec: Spec) -> float:
  """XLA FLOPs of the method's train step, lowered on abstract values (nothing compiled or
  allocated: ResNet-50 at 224 costs seconds of tracing on a laptop)."""
  from dense_ssl import methods as methods_lib  # pylint: disable=g-import-not-at-top
  from dense_ssl import optim, sharding  # pylint: disable=g-import-not-at-top
  from dense_ssl.data import spec as spec_lib  # pylint: disable=g-import-not-at-top
  from dense_ssl.state import TrainState  # pylint: disable=g-import-not-at-top
  train = common.import_trainer()
  config = spec.config()
  mesh = step.make_mesh(spec.devices)
  durations = optim.durations(config, spec.batch)
  method = methods_lib.create(config, durations)
  shapes = spec_lib.batch_shapes(method.views(), spec.batch)
  init_batch = spec_lib.example_batch(shapes, rows=min(spec.batch, 8))
  lr_fn = optim.learning_rate_fn(config.optim, durations.total_steps, durations.warmup_steps,
                                 spec.batch)
  variables = jax.eval_shape(method.init, jax.random.key(0), init_batch)
  tx = optim.create_optimizer(config.optim, lr_fn, variables["params"], durations)
  abstract = jax.eval_shape(lambda v: TrainState.create(variables=v, tx=tx,
                                                        rng=jax.random.key(1)), variables)
  replicated = sharding.replicated(mesh)
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                       abstract)
  batch_sharding = sharding.batch_sharded(mesh)
  batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
           for k, (shape, dtype) in shapes.items()}
  with jax.set_mesh(mesh):
    lowered = train.jit_step(method, config, lr_fn, state, mesh).lower(state, batch)
  return common.lowered_flops(lowered)


def measure(specs: Sequence[Spec], *, repeats: int, iters: int, warmup: int) -> list[dict]:
  steps = {}
  for s in specs:
    print(f"# compiling {s.method} on {s.label} ...", flush=True)
    steps[s.method] = step.JaxStep(s, warmup=warmup)
  times = common.interleave(
      {name: functools.partial(st.run_round, iters) for name, st in steps.items()}, repeats)
  rows = []
  for name, st in steps.items():
    row = step.result_row(st, times[name], iters)
    row["method"] = LABELS[name]
    rows.append(row)
  return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="resnet18")
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--instance_size", type=int, default=96)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--dtype", default="float32", choices=step.DTYPES)
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--iters", type=int, default=2)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--flops_only", action="store_true",
                  help="only the XLA FLOP ratios, from the lowered steps (no compile, no run)")
  args = p.parse_args(argv)
  print(common.machine_header(jax.devices()))
  methods = common.parse_list(args.methods)
  specs = [Spec(m, model=args.model, size=args.size, instance_size=args.instance_size,
                batch=args.batch, dtype=args.dtype) for m in methods]
  if args.flops_only:
    flops = {LABELS[s.method]: step_flops(s) for s in specs}
    for name, value in flops.items():
      print(f"{name}: {value / args.batch / 1e9:.2f} GFLOP per image ({specs[0].label})")
    for name, base in (("UniVIP", "BYOL"), ("BYOL", "MoCo-v2"), ("UniVIP", "MoCo-v2")):
      if name in flops and base in flops:
        print(f"{name}/{base} XLA FLOP ratio {common.fmt(flops[name] / flops[base])}")
    return {"flops": flops}
  rows = measure(specs, repeats=args.repeats, iters=args.iters, warmup=args.warmup)
  print(common.table(rows, ("method", "model", "size", "dtype", "batch", "bn", "img/s",
                            "ms/step", "spread", "compile s", "GFLOP/img")))
  by = {r["method"]: r for r in rows}
  result: dict[str, Any] = {"rows": rows}
  pairs = [("UniVIP", "BYOL"), ("BYOL", "MoCo-v2"), ("UniVIP", "MoCo-v2")]
  for name, base in pairs:
    if name in by and base in by:
      paired = [a / b for a, b in zip(by[name]["times"], by[base]["times"])]
      ratio, flops = common.median(paired), by[name]["flops"] / by[base]["flops"]
      result[f"{name}/{base}"] = (ratio, flops)
      print(f"{name}/{base} step time {common.fmt(ratio)} (paired median of {len(paired)} "
            f"interleaved rounds) | XLA FLOP ratio {common.fmt(flops)} | {specs[0].label}")
  if "UniVIP" in by:
    univip_cfg = specs[methods.index("univip")].config()
    k, dim = int(univip_cfg.method.num_instances), int(univip_cfg.method.dim)
    term = instance_term_seconds(args.batch, k, dim, repeats=args.repeats, iters=20)
    step_s = by["UniVIP"]["ms/step"] / 1e3
    extra = step_s - by["BYOL"]["ms/step"] / 1e3 if "BYOL" in by else float("nan")
    for name in ("sinkhorn", "ot_loss"):
      print(f"{name} (B={args.batch}, K={k}, D={dim}): {term[f'{name}_s'] * 1e3:.3f} ms = "
            f"{100 * term[f'{name}_s'] / step_s:.2f}% of UniVIP's step, "
            f"{100 * term[f'{name}_s'] / extra:.1f}% of its extra time over BYOL; XLA FLOPs "
            f"{term[f'{name}_flops']:.3g} (loop body once) vs the step's "
            f"{by['UniVIP']['flops']:.3g}")
    result.update(term)
  return result


if __name__ == "__main__":
  main()
