"""Shared helpers of the benchmark scripts: plain configs, interleaved timing, memory, tables.

Nothing here imports TensorFlow, ml_collections or clu at module level: the benchmarks must run
on an accelerator machine that has only jax, flax, optax (and torch for the peer script). The
project's configs are used when `ml_collections` is importable; otherwise `fallback_config`
rebuilds the same values (tests/test_benchmarks.py checks that the two agree).
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# Repository root on sys.path, so `python benchmarks/step.py` finds `dense_ssl` and `configs`.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

METHOD_LABELS = {"mocov2": "MoCo-v2", "densecl": "DenseCL", "houghcl": "HoughCL"}

# Dense bf16 peak FLOP/s per device used for MFU. H100/H200 SXM spec sheets say 989 TFLOP/s
# dense bf16; REFERENCES.md ("Throughput anchors") budgets with 790 TFLOP/s (the rate the
# tensor cores sustain at realistic clocks), and so do we, so MFU here is comparable to the
# anchors there. TPU figures are per JAX device (per chip; per core on v2/v3).
PEAK_TFLOPS = (
    ("H100", 790.0), ("H200", 790.0), ("A100", 312.0),
    ("TPU v6", 918.0), ("TPU v5p", 459.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0),
    ("TPU v4", 275.0), ("TPU v3", 61.5), ("TPU v2", 22.5),
)
PEAK_NOTE = ("MFU = XLA cost-analysis FLOPs per step / step time / peak, with peak = the dense "
             "bf16 rate (H100/H200: 790 TFLOP/s as in REFERENCES.md, spec sheet 989) for every "
             "dtype")


class AttrDict(dict):
  """A dict with attribute access: the parts of ConfigDict that dense_ssl code uses.

  Methods read `config.method.temperature`, `"queue_size" in config.method`,
  `config.method.get(...)`, and augmentation reads attributes with `getattr`; nested dicts are
  converted on construction.
  """

  def __init__(self, *args: Any, **kwargs: Any):
    super().__init__(*args, **kwargs)
    for key, value in self.items():
      if isinstance(value, Mapping) and not isinstance(value, AttrDict):
        self[key] = AttrDict(value)

  def __getattr__(self, name: str) -> Any:
    try:
      return self[name]
    except KeyError:
      raise AttributeError(f"Config has no field {name!r}; fields: {sorted(self)}.") from None

  def __setattr__(self, name: str, value: Any) -> None:
    if name not in self:
      raise AttributeError(f"Config has no field {name!r}; fields: {sorted(self)}.")
    self[name] = AttrDict(value) if isinstance(value, Mapping) else value

  def to_dict(self) -> dict[str, Any]:
    return {k: v.to_dict() if isinstance(v, AttrDict) else v for k, v in self.items()}


def fallback_config(method: str) -> AttrDict:
  """configs/<method>.py's default variant, rebuilt without ml_collections."""
  if method not in METHOD_LABELS:
    raise ValueError(f"Unknown method {method!r}; valid choices: {', '.join(METHOD_LABELS)}.")
  m = dict(name=method, module="", temperature=0.2, queue_size=65536, momentum=0.999,
           momentum_schedule="constant", dim=128, hidden=2048, bn="shuffle", bn_groups=8)
  if method != "mocov2":
    m.update(loss_lambda=0.5, dense_chunk=4096)
  if method == "houghcl":
    m.update(hough_revision=2, hough_power=3.0, hough_smooth_side=3, hough_kappa=3.0,
             hough_mirror=False)
  return AttrDict(
      seed=0, batch_size=256, total_epochs=200.0, total_steps=0,
      model=dict(name="resnet50", zero_init_residual=False, half_precision=False),
      data=dict(source="imagenet2012", data_dir="", folder="", split="train", image_size=224,
                crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3), flip=True,
                shuffle_buffer=10_000, demo_num_images=1024, prefetch=2,
                scenes_num_images=10_000, scenes_size=96, scenes_background_pool=0,
                scenes_tint=True, folder_decoder="tf"),
      augment=dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                   presets=dict(mocov2=dict(
                       brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, jitter_prob=0.8,
                       grey_prob=0.2, blur_prob=0.5, blur_sigma=(0.1, 2.0),
                       solarize_prob=0.0))),
      optim=dict(name="sgd", lr=0.03, momentum=0.9, weight_decay=1e-4, schedule="cosine",
                 warmup_epochs=0.0, b1=0.9, b2=0.999, base_batch_size=0,
                 weight_decay_end=-1.0, clip_grad_norm=0.0, clip_grad_per_tensor=False,
                 no_decay=(), frozen=(),
                 freeze_early=(), freeze_early_epochs=0.0),
      method=m, evals={}, eval_every_steps=0, log_every_steps=50, checkpoint_every_steps=1000,
      keep_checkpoints=3, nan_policy="stop")


def project_config(method: str) -> tuple[AttrDict, str]:
  """(config, where it came from): configs/<method>.py when ml_collections is installed."""
  try:
    import importlib  # pylint: disable=g-import-not-at-top
    module = importlib.import_module(f"configs.{method}")
    return AttrDict(module.get_config().to_dict()), f"configs/{method}.py"
  except ModuleNotFoundError as error:
    if error.name not in ("ml_collections", "configs"):
      raise
    return fallback_config(method), "benchmarks/common.py fallback (no ml_collections)"


def bench_config(method: str, *, model: str, image_size: int, batch: int, half_precision: bool,
                 queue: int | None = None, dense_chunk: int | None = None,
                 bn: str | None = None, bn_groups: int | None = None,
                 hidden: int | None = None, dim: int | None = None,
                 total_steps: int = 10_000) -> AttrDict:
  """The method's paper recipe with the benchmarked sizes; None keeps the recipe's value.

  `total_steps` only shapes the schedules (any value gives the same step cost).
  """
  c, _ = project_config(method)
  c.total_epochs, c.total_steps = 0.0, int(total_steps)
  c.model.name = model
  c.model.half_precision = bool(half_precision)
  c.data.source = "synthetic"
  c.data.image_size = int(image_size)
  c.batch_size = int(batch)
  overrides = dict(queue_size=queue, dense_chunk=dense_chunk, bn=bn, bn_groups=bn_groups,
                   hidden=hidden, dim=dim)
  for key, value in overrides.items():
    if value is not None and key in c.method:
      c.method[key] = value
  return c


def import_trainer() -> Any:
  """`dense_ssl.train`: its `build` and `train_step` need neither TensorFlow nor clu (only
  `train.run` imports them), so this works on the accelerator machines too."""
  import importlib  # pylint: disable=g-import-not-at-top
  return importlib.import_module("dense_ssl.train")


def fit_bn_groups(groups: int, batch: int, devices: int) -> int:
  """The largest group count <= `groups` that divides `batch` and is a multiple of `devices`.

  The paper's 8 groups (8 GPUs x 32) do not divide every small benchmark batch; rather than
  fail we use the nearest valid count and print it in the table.
  """
  for g in range(min(groups, batch), 0, -1):
    if batch % g == 0 and g % devices == 0:
      return g
  raise ValueError(f"No BatchNorm group count divides batch {batch} over {devices} devices; "
                   f"use a batch that is a multiple of the device count.")


# ---------------------------------------------------------------------------------- timing ---


def interleave(rounds: Mapping[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
  """Calls every entry's round once per repeat, in turn, and collects the seconds each returns.

  Interleaving (A B C A B C ...) rather than blocking (A A A B B B ...) spreads slow phases of a
  shared machine over all entries alike, so ratios measured in one run stay meaningful.
  """
  times: dict[str, list[float]] = {name: [] for name in rounds}
  for _ in range(repeats):
    for name, run_round in rounds.items():
      times[name].append(float(run_round()))
  return times


def median(values: Sequence[float]) -> float:
  return float(statistics.median(values))


def spread(values: Sequence[float]) -> float:
  """(max - min) / median of the per-round times: how noisy the measurement was."""
  mid = median(values)
  return (max(values) - min(values)) / mid if mid > 0 else float("nan")


class Stopwatch:
  """`with Stopwatch() as t: ...` then `t.seconds`."""

  def __enter__(self) -> Stopwatch:
    self._start = time.perf_counter()
    self.seconds = float("nan")
    return self

  def __exit__(self, *exc: Any) -> None:
    self.seconds = time.perf_counter() - self._start


# ------------------------------------------------------------------------ machine and memory ---


def cpu_cores() -> int:
  """CPU cores this process may run on (the affinity mask, not the machine's total)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # macOS
    return os.cpu_count() or 1


def rss_high_water_bytes() -> int:
  """The process's peak resident set size (Linux reports KiB, macOS bytes)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak if sys.platform == "darwin" else peak * 1024


def peak_memory(device: Any) -> tuple[float, str]:
  """(bytes, label): the device allocator's peak when it reports one, else the process RSS peak.

  Both are high-water marks over the whole process so far, not per configuration; the per-
  configuration footprint is XLA's compiled memory analysis (see step.py).
  """
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    return float(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
  return float(rss_high_water_bytes()), "process RSS high-water (fallback: no device stats)"


def compiled_bytes(compiled: Any, what: str = "footprint") -> float:
  """XLA's memory analysis of a compiled computation, per device, in bytes (nan if absent).

  `what="footprint"`: arguments + outputs - donated aliases + temporaries; `"temp"`: the
  temporaries alone.
  """
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (backends without memory analysis)
    return float("nan")
  if m is None:
    return float("nan")
  if what == "temp":
    return float(m.temp_size_in_bytes)
  return float(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes +
               m.temp_size_in_bytes)


def lowered_flops(stage: Any) -> float:
  """FLOPs per device per call from XLA's cost analysis of a lowered or compiled computation
  (NaN where the backend gives none)."""
  try:
    cost = stage.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (some backends do not implement it)
    return float("nan")
  if isinstance(cost, (list, tuple)):  # older jax: one dict per partition
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))


def peak_flops(device_kind: str, platform_name: str, override_tflops: float = 0.0) -> float:
  """Peak FLOP/s of one device for MFU; 0 on CPUs and unknown devices (MFU not reported)."""
  if override_tflops > 0:
    return override_tflops * 1e12
  if platform_name == "cpu":
    return 0.0
  for key, tflops in PEAK_TFLOPS:
    if key.lower() in device_kind.lower():
      return tflops * 1e12
  return 0.0


def machine_header(devices: Sequence[Any]) -> str:
  """One line naming the date, devices, host cores and library versions."""
  import jax  # pylint: disable=g-import-not-at-top
  kinds = sorted({d.device_kind for d in devices})
  date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
  return (f"# {date} | {len(devices)} x {', '.join(kinds)} ({devices[0].platform}) | "
          f"{cpu_cores()} CPU cores ({cpu_model()}) | {platform.node()} | "
          f"python {platform.python_version()} jax {jax.__version__}")


def cpu_model() -> str:
  """The host CPU's model name and widest x86 vector ISA, e.g. 'AMD EPYC, AVX-512'.

  CPU numbers depend on it more than on anything else here: on an AVX-512 host XLA:CPU's and
  PyTorch's kernels compare differently than on an AVX2 host (RESULTS.md, section 2).
  """
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      info = f.read()
  except OSError:
    return platform.processor() or platform.machine()
  model = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
  flags = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
  flags = set(flags[1].split()) if flags else set()
  isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
  return ", ".join(x for x in ((model[1].strip() if model else platform.machine()), isa) if x)


# ------------------------------------------------------------------------------ formatting ---


def fmt(value: Any, digits: int = 3) -> str:
  """Numbers with `digits` significant digits; 'n/a' for None/NaN; strings unchanged."""
  if value is None:
    return "n/a"
  if isinstance(value, str):
    return value
  if isinstance(value, int) and not isinstance(value, bool):
    return str(value)
  if not math.isfinite(value):
    return "n/a"
  if value == 0:
    return "0"
  magnitude = math.floor(math.log10(abs(value)))
  decimals = max(digits - 1 - magnitude, 0)
  return f"{value:.{decimals}f}"


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
  """A GitHub-markdown table of `rows` restricted to `columns` (in that order)."""
  cells = [[fmt(row.get(c)) for c in columns] for row in rows]
  widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
  line = lambda values: "| " + " | ".join(v.rjust(w) for v, w in zip(values, widths)) + " |"
  out = [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
  out.extend(line(r) for r in cells)
  return "\n".join(out)


def parse_list(text: str, kind: Callable[[str], Any] = str) -> list[Any]:
  """'a,b,c' -> [kind(a), kind(b), kind(c)] (empty items dropped)."""
  return [kind(item.strip()) for item in text.split(",") if item.strip()]
