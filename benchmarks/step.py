"""Training-step throughput of MoCo-v2, DenseCL and HoughCL: images/s, compile time, memory, MFU.

    python benchmarks/step.py                      # short default (CPU: ResNet-50/224, batch 8)
    python benchmarks/step.py --models=resnet18,resnet50 --sizes=224 --batch=256 \
        --dtypes=float32,bfloat16 --repeats=5 --iters=20          # accelerator measurement
    python benchmarks/step.py --scaling            # 1 vs 8 devices (8 fake CPU devices on a CPU)

What is timed is the project's own `dense_ssl.train.train_step` (on-device colour augmentation,
momentum update, both encoders, the loss, SGD, the queue updates), compiled exactly as
`train.run` compiles it (explicit shardings, donated state), on a synthetic uint8 batch that
lives on the device, so no input pipeline (and no TensorFlow) is involved.

Per configuration: images/s at steady state (median over `--repeats` timed rounds of `--iters`
steps, after compilation and `--warmup` steps), the rounds' spread, compile time (lower +
compile), model FLOPs per sample, MFU on accelerators, XLA's compiled memory footprint and
the device's (or, on CPU, the process's) peak memory. Model FLOPs are XLA's cost analysis of
the lowered step with the dense logits materialised (`--dense_chunk=0`): the chunked dense
loss (the configs' default) recomputes each chunk's logits in the backward pass, work that MFU
by definition does not count, and XLA counts a loop body only once.

Methods that differ only in their loss are timed in interleaved rounds (MoCo-v2, DenseCL,
HoughCL, MoCo-v2, ...), so noise from a shared machine hits all of them alike, and their step
time ratios are paired per round (HoughCL/DenseCL too). The last printed line is
`DenseCL/MoCo-v2 = <ratio>`: the step-time ratio (>1 means DenseCL is slower) of the headline configuration (ResNet-50 at 224,
bfloat16 on accelerators, when measured).
"""

from __future__ import annotations

import os
import sys

# `--scaling` on a CPU needs several (fake) devices, which XLA creates only if told before jax
# is imported; on GPU/TPU machines the flag only adds unused CPU devices.
if __name__ == "__main__" and "--scaling" in sys.argv:
  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses  # pylint: disable=wrong-import-position
import functools  # pylint: disable=wrong-import-position
import math  # pylint: disable=wrong-import-position
import time  # pylint: disable=wrong-import-position
from collections.abc import Iterator, Sequence  # pylint: disable=wrong-import-position
from typing import Any  # pylint: disable=wrong-import-position

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from jax.sharding import AxisType, Mesh, NamedSharding  # pylint: disable=wrong-import-position
from jax.sharding import PartitionSpec as P  # pylint: disable=wrong-import-position

from benchmarks import common  # pylint: disable=wrong-import-position

METHODS = ("mocov2", "densecl", "houghcl")
DTYPES = ("float32", "bfloat16")
# The schedule length only shapes the cosine learning rate; any value gives the same step cost.
SCHEDULE_STEPS = 10_000
STRIDE = 32

COLUMNS = ("method", "model", "size", "dtype", "batch", "dev", "bn", "img/s", "ms/step",
           "spread", "compile s", "GFLOP/img", "TFLOP/s/dev", "MFU", "XLA mem GB",
           "peak mem GB")


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """One benchmarked configuration; `batch` is the global batch over `devices` devices."""
  method: str
  model: str = "resnet50"
  size: int = 224
  batch: int = 8
  dtype: str = "float32"
  queue: int = 65536
  dense_chunk: int = 4096
  bn: str = "shuffle"
  bn_groups: int = 8
  hidden: int | None = None
  dim: int | None = None
  devices: int = 1

  @property
  def group(self) -> StepSpec:
    """The spec without its method: configurations whose methods are compared."""
    return dataclasses.replace(self, method="")

  @property
  def label(self) -> str:
    return (f"{self.model}/{self.size} {self.dtype} batch {self.batch} on {self.devices} "
            f"device{'s' if self.devices > 1 else ''}")

  def config(self) -> common.AttrDict:
    if self.method not in METHODS:
      raise ValueError(f"Unknown method {self.method!r}; valid choices: {', '.join(METHODS)}.")
    if self.dtype not in DTYPES:
      raise ValueError(f"Unknown dtype {self.dtype!r}; valid choices: {', '.join(DTYPES)}.")
    if self.size % STRIDE:
      raise ValueError(f"Image size {self.size} must be a multiple of {STRIDE}.")
    if self.queue % self.batch:
      raise ValueError(f"Queue {self.queue} must be a multiple of the batch {self.batch} "
                       f"(whole batches are enqueued).")
    groups = common.fit_bn_groups(self.bn_groups, self.batch, self.devices)
    return common.bench_config(
        self.method, model=self.model, image_size=self.size, batch=self.batch,
        half_precision=self.dtype == "bfloat16", queue=self.queue, dense_chunk=self.dense_chunk,
        bn=self.bn, bn_groups=groups, hidden=self.hidden, dim=self.dim,
        total_steps=SCHEDULE_STEPS)


def make_mesh(num_devices: int) -> Mesh:
  """A 1-D "data" mesh over the first `num_devices` devices (as sharding.create_mesh over all)."""
  devices = jax.devices()
  if not 1 <= num_devices <= len(devices):
    raise ValueError(f"--devices={num_devices} but {len(devices)} {devices[0].platform} "
                     f"devices are visible.")
  return Mesh(np.asarray(devices[:num_devices]), ("data",), axis_types=(AxisType.Auto,))


def synthetic_batch(shapes: dict[str, tuple[tuple[int, ...], Any]], mesh: Mesh,
                    seed: int = 0) -> dict[str, jax.Array]:
  """A host batch of the method's `shapes` (uint8 views, grids, boxes, flips), on device.

  Views are uniform noise; each view's box is a random crop and its grid the cell centres, so
  the geometric correspondence metrics see plausible values. Costs do not depend on values.
  """
  rng = np.random.default_rng(seed)
  out: dict[str, np.ndarray] = {}
  for key, (shape, dtype) in shapes.items():
    if dtype == np.uint8:
      out[key] = rng.integers(0, 256, shape, dtype=np.uint8)
    elif key.endswith("_coords"):
      continue  # from the view's box below
    elif key.endswith("_box"):
      batch = shape[0]
      side = rng.uniform(0.45, 1.0, (batch, 2)).astype(np.float32)
      origin = (rng.uniform(0.0, 1.0, (batch, 2)) * (1.0 - side)).astype(np.float32)
      out[key] = np.concatenate([origin, origin + side], axis=1)
      coords = key[:-len("_box")] + "_coords"
      if coords in shapes:
        grid = shapes[coords][0][1]
        centres = (np.arange(grid, dtype=np.float32) + 0.5) / grid
        ys = origin[:, 0, None] + centres[None] * side[:, 0, None]
        xs = origin[:, 1, None] + centres[None] * side[:, 1, None]
        out[coords] = np.stack(np.broadcast_arrays(ys[:, :, None], xs[:, None, :]), -1)
    elif key.endswith("_valid"):
      out[key] = np.ones(shape, bool)
    else:
      out[key] = np.zeros(shape, dtype)
  sharding = NamedSharding(mesh, P("data"))
  return {k: jax.device_put(v, sharding) for k, v in out.items()}


class JaxStep:
  """The compiled `train_step` of one spec with its state and batch, ready to be timed.

  Construction builds everything with the trainer's own `train.build` (method, optimiser,
  state, the jitted step), compiles (timed), runs `warmup` steps and checks that the loss is
  finite; `run_round(iters)` returns the seconds `iters` more steps take.
  """

  def __init__(self, spec: StepSpec, *, warmup: int = 1, seed: int = 0):
    start = time.perf_counter()
    from dense_ssl import methods as methods_lib  # pylint: disable=g-import-not-at-top
    train = common.import_trainer()

    self.spec = spec
    self.config = config = spec.config()
    self.mesh = make_mesh(spec.devices)
    built = train.build(config, self.mesh, num_examples=spec.batch)
    self.state = built.state
    self.batch = synthetic_batch(built.batch_spec, self.mesh, seed)

    with jax.set_mesh(self.mesh):
      with common.Stopwatch() as watch:
        lowered = built.step.lower(self.state, self.batch)
        self.compiled = lowered.compile()
      self.compile_s = watch.seconds
      if spec.method != "mocov2" and spec.dense_chunk > 0:
        # The same step with materialised logits, lowered only (not compiled).
        plain = dataclasses.replace(spec, dense_chunk=0).config()
        method = methods_lib.create(plain, built.durations)
        lowered = train.jit_step(method, plain, built.lr_fn, self.state,
                                 self.mesh).lower(self.state, self.batch)
      self.flops = common.lowered_flops(lowered)
    self.xla_bytes = common.compiled_bytes(self.compiled)

    metrics = None
    for _ in range(max(warmup, 1)):
      metrics = self._steps(1)
    self.loss = float(jax.device_get(metrics["train/loss"]))
    if not math.isfinite(self.loss):
      raise FloatingPointError(f"{spec.method} on {spec.label}: the warm-up loss is "
                               f"{self.loss}; the timings would not be of a working step.")
    self.memory, self.memory_label = common.peak_memory(self.mesh.devices.flat[0])
    # Everything before steady state: state init, compilation, warm-up steps.
    self.setup_s = time.perf_counter() - start

  def _steps(self, iters: int,
             batches: Iterator[dict[str, jax.Array]] | None = None) -> dict[str, jax.Array]:
    metrics = {}
    with jax.set_mesh(self.mesh):
      for _ in range(iters):
        batch = self.batch if batches is None else next(batches)
        self.state, metrics = self.compiled(self.state, batch)
      jax.block_until_ready((self.state, metrics))
    return metrics

  def run_round(self, iters: int,
                batches: Iterator[dict[str, jax.Array]] | None = None) -> float:
    """Seconds for `iters` steps on the fixed batch, or on `batches` (global arrays) if given."""
    with common.Stopwatch() as watch:
      self._steps(iters, batches)
    return watch.seconds


def augment_seconds(spec: StepSpec, *, repeats: int = 3, iters: int = 1) -> float:
  """Seconds per step of the on-device colour augmentation alone (every view), median.

  The train step runs `augment.augment_views` first; timing it alone tells how much of the
  step is augmentation rather than the method (the PyTorch peer receives augmented inputs).
  """
  from dense_ssl import methods as methods_lib  # pylint: disable=g-import-not-at-top
  from dense_ssl.data import augment  # pylint: disable=g-import-not-at-top  (no TensorFlow)
  from dense_ssl.data import spec as spec_lib  # pylint: disable=g-import-not-at-top
  config = spec.config()
  mesh = make_mesh(spec.devices)
  views = methods_lib.create(config).views()
  images = {v.name: spec_lib.batch_shapes([v], spec.batch)[v.name] for v in views}
  batch = synthetic_batch(images, mesh)
  fn = jax.jit(lambda rng, b: augment.augment_views(rng, b, views, config.augment))
  with jax.set_mesh(mesh):
    compiled = fn.lower(jax.random.key(0), batch).compile()
    jax.block_until_ready(compiled(jax.random.key(0), batch))

    def one_round() -> float:
      with common.Stopwatch() as watch:
        out = None
        for i in range(iters):
          out = compiled(jax.random.key(i), batch)
        jax.block_until_ready(out)
      return watch.seconds

    times = common.interleave({"augment": one_round}, repeats)["augment"]
  return common.median(times) / iters


def _bn_label(method_cfg: Any) -> str:
  """'sync' (whole-batch statistics) or '<mode>/<groups>' (per-group statistics)."""
  return "sync" if method_cfg.bn == "sync" else f"{method_cfg.bn}/{method_cfg.bn_groups}"


def result_row(step: JaxStep, times: Sequence[float], iters: int,
               peak_tflops: float = 0.0) -> dict[str, Any]:
  """The table row of one measured configuration (`times`: seconds per round)."""
  spec = step.spec
  device = step.mesh.devices.flat[0]
  sec_per_step = common.median(times) / iters
  flops_per_s = step.flops / sec_per_step
  peak = common.peak_flops(device.device_kind, device.platform, peak_tflops)
  return {
      "method": spec.method, "model": spec.model, "size": spec.size, "dtype": spec.dtype,
      "batch": spec.batch, "dev": spec.devices, "bn": _bn_label(step.config.method),
      "img/s": spec.batch / sec_per_step, "ms/step": 1e3 * sec_per_step,
      "spread": common.spread(times), "compile s": step.compile_s,
      "GFLOP/img": step.flops * spec.devices / spec.batch / 1e9,
      "TFLOP/s/dev": flops_per_s / 1e12,
      "MFU": flops_per_s / peak if peak else float("nan"),
      "XLA mem GB": step.xla_bytes / 1e9, "peak mem GB": step.memory / 1e9,
      "memory_source": step.memory_label, "flops": step.flops, "times": list(times),
      "iters": iters, "loss": step.loss, "spec": spec,
  }


def measure(specs: Sequence[StepSpec], *, repeats: int, iters: int, warmup: int = 1,
            peak_tflops: float = 0.0, verbose: bool = True) -> list[dict[str, Any]]:
  """Measures every spec; specs that differ only in their method are timed interleaved."""
  groups: dict[StepSpec, list[StepSpec]] = {}
  for spec in specs:
    groups.setdefault(spec.group, []).append(spec)
  rows = []
  for group, members in groups.items():
    if verbose:
      print(f"# compiling {', '.join(s.method for s in members)} on {group.label} ...",
            flush=True)
    steps = {s.method: JaxStep(s, warmup=warmup) for s in members}
    times = common.interleave(
        {name: functools.partial(step.run_round, iters) for name, step in steps.items()},
        repeats)
    rows.extend(result_row(steps[name], times[name], iters, peak_tflops) for name in steps)
    del steps  # free the states before the next group compiles
  return rows


# (method, baseline) step-time ratios printed per group: the targets.
RATIO_PAIRS = (("densecl", "mocov2"), ("houghcl", "mocov2"), ("houghcl", "densecl"))


def ratios(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per group: step-time and model-FLOP ratios of each pair in `RATIO_PAIRS` measured there.

  The time ratio is the median over rounds of the per-round ratio: rounds were interleaved,
  so a round's pair saw the same machine state.
  """
  out = []
  by_group: dict[StepSpec, dict[str, dict[str, Any]]] = {}
  for row in rows:
    by_group.setdefault(row["spec"].group, {})[row["spec"].method] = row
  for group, members in by_group.items():
    for name, base_name in RATIO_PAIRS:
      if name not in members or base_name not in members:
        continue
      row, base = members[name], members[base_name]
      paired = [t / b for t, b in zip(row["times"], base["times"])]
      out.append({"method": name, "base": base_name, "group": group,
                  "time_ratio": common.median(paired),
                  "flop_ratio": row["flops"] / base["flops"], "rounds": len(paired)})
  return out


def headline(ratio_rows: Sequence[dict[str, Any]], method: str = "densecl") -> dict[str, Any]:
  """The ratio to print last: ResNet-50 at 224 first, bfloat16 on accelerators, else float32."""
  candidates = [r for r in ratio_rows if r["method"] == method and r["base"] == "mocov2"]
  if not candidates:
    raise ValueError(f"No {method}/MoCo-v2 ratio: include both in --methods.")
  accelerator = jax.devices()[0].platform != "cpu"

  def rank(r: dict[str, Any]) -> tuple:
    g = r["group"]
    return (g.model == "resnet50", g.size == 224,
            g.dtype == ("bfloat16" if accelerator else "float32"), g.batch)

  return max(candidates, key=rank)


def ratio_line(r: dict[str, Any]) -> str:
  label = f"{common.METHOD_LABELS[r['method']]}/{common.METHOD_LABELS[r['base']]}"
  return (f"{label} step time {common.fmt(r['time_ratio'])} (paired median of "
          f"{r['rounds']} interleaved rounds) | model FLOP ratio {common.fmt(r['flop_ratio'])} "
          f"| {r['group'].label}")


def print_report(rows: Sequence[dict[str, Any]], ratio_rows: Sequence[dict[str, Any]]) -> None:
  print(common.table(rows, COLUMNS))
  sources = sorted({r["memory_source"] for r in rows})
  print(f"# peak mem: {'; '.join(sources)} (a running high-water mark, taken after each "
        f"config's warm-up); XLA mem: the compiled step's args + outputs - donated + temps.")
  if jax.devices()[0].platform != "cpu":
    print(f"# {common.PEAK_NOTE}.")
  for r in ratio_rows:
    print(ratio_line(r))


# ------------------------------------------------------------------------------- scaling ---


def scaling(spec: StepSpec, counts: Sequence[int], *, repeats: int, iters: int,
            warmup: int = 1) -> list[dict[str, Any]]:
  """Throughput of `spec` on each device count in `counts` (global batch fixed), interleaved."""
  steps = {n: JaxStep(dataclasses.replace(spec, devices=n), warmup=warmup) for n in counts}
  times = common.interleave(
      {n: functools.partial(step.run_round, iters) for n, step in steps.items()}, repeats)
  rows = [result_row(steps[n], times[n], iters) for n in counts]
  base = rows[0]["img/s"]
  for row in rows:
    row["speed-up"] = row["img/s"] / base
    row["img/s/dev"] = row["img/s"] / row["dev"]
  return rows


# ---------------------------------------------------------------------------------- main ---


def _defaults(accelerator: bool, scaling_mode: bool) -> dict[str, Any]:
  """Flag defaults: a short CPU run (<= 10 min on 2 cores) or an accelerator measurement."""
  if scaling_mode:
    return dict(methods="densecl", models="resnet18", sizes="64" if not accelerator else "224",
                batch=16 if not accelerator else 256, dtypes="float32" if not accelerator
                else "bfloat16", repeats=3, iters=2 if not accelerator else 20, warmup=3)
  if accelerator:
    return dict(methods=",".join(METHODS), models="resnet18,resnet50", sizes="224", batch=256,
                dtypes="float32,bfloat16", repeats=5, iters=20, warmup=3)
  # Three warm-up steps: after one, rounds spread by 0.2-0.5 on a 2-core VM, after three by
  # 0.04-0.08 (RESULTS.md, section 1a); the run still takes ~2 minutes.
  return dict(methods=",".join(METHODS), models="resnet50", sizes="224", batch=8,
              dtypes="float32", repeats=5, iters=1, warmup=3)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--methods", help=f"comma list of {', '.join(METHODS)}")
  p.add_argument("--models", help="comma list of resnet18, resnet34, resnet50, resnet101")
  p.add_argument("--sizes", help="comma list of image sides (multiples of 32)")
  p.add_argument("--batch", type=int, help="global batch (over --devices devices)")
  p.add_argument("--dtypes", help="comma list of float32, bfloat16 (compute dtype)")
  p.add_argument("--repeats", type=int, help="timed rounds per configuration (median)")
  p.add_argument("--iters", type=int, help="steps per timed round")
  p.add_argument("--warmup", type=int, help="untimed steps after compilation")
  p.add_argument("--queue", type=int, default=65536, help="queue length K (paper: 65536)")
  p.add_argument("--dense_chunk", type=int, default=4096,
                 help="DenseCL/HoughCL dense-loss queue chunk (configs' default 4096; "
                      "0 = materialised logits)")
  p.add_argument("--bn", default="shuffle", choices=("shuffle", "sync", "none"))
  p.add_argument("--bn_groups", type=int, default=8, help="BatchNorm groups (paper: 8 GPUs)")
  p.add_argument("--hidden", type=int, default=None, help="neck hidden width (paper: 2048)")
  p.add_argument("--dim", type=int, default=None, help="embedding dim (paper: 128)")
  p.add_argument("--devices", type=int, default=None,
                 help="use the first n devices (default 1; --scaling: all, at least 8 on CPU)")
  p.add_argument("--peak_tflops", type=float, default=0.0,
                 help="peak TFLOP/s per device for MFU (default: built-in table)")
  p.add_argument("--scaling", action="store_true",
                 help="throughput on 1 vs n devices at a fixed global batch")
  args = p.parse_args(argv)
  accelerator = jax.devices()[0].platform != "cpu"
  for key, value in _defaults(accelerator, args.scaling).items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  return args


def specs_from_args(args: argparse.Namespace) -> list[StepSpec]:
  """The cross product models x sizes x dtypes x methods, methods innermost (interleaved)."""
  specs = []
  for model in common.parse_list(args.models):
    for size in common.parse_list(args.sizes, int):
      for dtype in common.parse_list(args.dtypes):
        for method in common.parse_list(args.methods):
          specs.append(StepSpec(
              method=method, model=model, size=size, batch=args.batch, dtype=dtype,
              queue=args.queue, dense_chunk=args.dense_chunk, bn=args.bn,
              bn_groups=args.bn_groups, hidden=args.hidden, dim=args.dim,
              devices=args.devices or 1))
  return specs


def run_scaling(args: argparse.Namespace) -> list[dict[str, Any]]:
  """The `--scaling` mode: one row per device count, printed with the speed-up."""
  available = jax.device_count()
  most = args.devices or available
  if most < 2:
    raise SystemExit("--scaling needs several devices; on a CPU set XLA_FLAGS="
                     "--xla_force_host_platform_device_count=8 (done automatically when "
                     "step.py is run as a script).")
  spec = specs_from_args(args)[0]
  rows = scaling(spec, [1, most], repeats=args.repeats, iters=args.iters, warmup=args.warmup)
  print(common.table(rows, ("method", "model", "size", "dtype", "batch", "dev", "bn", "img/s",
                            "img/s/dev", "speed-up", "spread", "compile s")))
  if jax.devices()[0].platform == "cpu":
    print("# fake CPU devices share the host's cores: the ideal speed-up is 1.0, and the "
          "measured one shows the cost of partitioning the step, not parallel scaling.")
  else:
    print(f"# fixed global batch {spec.batch}: the ideal speed-up is {most}.")
  print(f"speed-up {most} vs 1 devices = {common.fmt(rows[-1]['speed-up'])}")
  return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the benchmark, prints the report; returns {"rows", "ratios"} for callers and tests."""
  args = parse_args(argv)
  print(common.machine_header(jax.devices()))
  if args.scaling:
    return {"rows": run_scaling(args), "ratios": []}
  _, source = common.project_config(common.parse_list(args.methods)[0])
  print(f"# configs: {source}; queue {args.queue}, dense_chunk {args.dense_chunk}, "
        f"{args.repeats} rounds x {args.iters} steps after {args.warmup} warm-up")
  if jax.config.jax_compilation_cache_dir:
    print(f"# persistent compilation cache {jax.config.jax_compilation_cache_dir}: "
          f"'compile s' may be a cache load")
  rows = measure(specs_from_args(args), repeats=args.repeats, iters=args.iters,
                 warmup=args.warmup, peak_tflops=args.peak_tflops)
  ratio_rows = ratios(rows)
  print_report(rows, ratio_rows)
  if any(r["method"] == "densecl" for r in ratio_rows):
    print(f"DenseCL/MoCo-v2 = {common.fmt(headline(ratio_rows)['time_ratio'])}")
  return {"rows": rows, "ratios": ratio_rows}


if __name__ == "__main__":
  main()
