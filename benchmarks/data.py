"""Input-pipeline throughput (two views + correspondence grids per image) against the step's.

    python benchmarks/data.py                        # demo photos and 64 JPEGs, 224 px
    python benchmarks/data.py --folder=/data/coco/train2017 --sources=folder --batch=256

Measures `dense_ssl.data.pipeline.create_iterator` (decode, two random resized crops with flips,
grids, boxes, batching; colour augmentation is on device, inside the step) in pairs/s:

* on the embedded demo photos (`source=demo`: crops of in-memory photos, no decoding), and
* on a folder of JPEGs (`source=folder`), by default 64 JPEGs written to a temporary
  directory from the scikit-image photos at ImageNet-like sizes (about 500 x 375),

once with tf.data restricted to one thread (per-core rate) and once with every core this
process may use. Then it times the training step at the same image size and batch (from
step.py) and, with `--end_to_end`, the step fed by the pipeline, and says which of the two
limits training on this machine and how many cores the pipeline needs to keep up with the step.
This script needs TensorFlow (the pipeline is tf.data); step.py and peer_torch.py do not.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import tempfile  # pylint: disable=wrong-import-position
from collections.abc import Iterator, Sequence  # pylint: disable=wrong-import-position
from typing import Any  # pylint: disable=wrong-import-position

import numpy as np  # pylint: disable=wrong-import-position

from benchmarks import common  # pylint: disable=wrong-import-position

COLUMNS = ("source", "size", "batch", "threads", "pairs/s", "pairs/s/core", "spread",
           "first batch s")
# ImageNet's typical photo: about 500 x 375 (4:3), JPEG quality 90.
JPEG_SHAPE = (375, 500)


def write_jpegs(folder: str, count: int = 64, seed: int = 0) -> list[str]:
  """Writes `count` JPEGs cut from the scikit-image photos (random crops, resized to 500x375)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from dense_ssl.data import sources  # pylint: disable=g-import-not-at-top
  photos = sources.demo_photos()
  rng = np.random.default_rng(seed)
  paths = []
  for i in range(count):
    photo = photos[i % len(photos)]
    h, w = photo.shape[:2]
    ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
    y0, x0 = rng.integers(h - ch + 1), rng.integers(w - cw + 1)
    crop = Image.fromarray(photo[y0:y0 + ch, x0:x0 + cw])
    shape = JPEG_SHAPE if i % 3 else JPEG_SHAPE[::-1]  # some portrait images too
    crop = crop.resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
    path = os.path.join(folder, f"img_{i:04d}.jpg")
    crop.save(path, quality=90)
    paths.append(path)
  return paths


def data_config(source: str, size: int, folder: str = "") -> common.AttrDict:
  """The project's data config with the benchmarked source and size."""
  cfg, _ = common.project_config("densecl")
  data = cfg.data
  data.source, data.image_size, data.folder = source, int(size), folder
  return data


def _dataset_iterator(data_cfg: Any, batch: int, threads: int) -> Iterator[dict[str, Any]]:
  """The pipeline's batches with tf.data's thread pool capped at `threads` (0 = default)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from dense_ssl.data import pipeline  # pylint: disable=g-import-not-at-top
  from dense_ssl.data import sources  # pylint: disable=g-import-not-at-top
  # The dataset that `pipeline.create_iterator` wraps, built directly: the wrapper starts an
  # iterator (and its prefetching) at once, which would compete with the one timed here.
  pipeline.hide_accelerators_from_tf()
  from dense_ssl.data import spec  # pylint: disable=g-import-not-at-top
  size = int(data_cfg.image_size)
  views = tuple(spec.ViewSpec(name, size, scale=tuple(data_cfg.crop_scale),
                              ratio=tuple(data_cfg.crop_ratio), grid=size // 32)
                for name in ("view1", "view2"))  # DenseCL's two views
  dataset = pipeline.build_dataset(sources.create(data_cfg), data_cfg, views=views,
                                   global_batch_size=batch, seed=0, start_step=0,
                                   process_index=0, process_count=1)
  if threads > 0:
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
    dataset = dataset.with_options(options)
  return dataset.as_numpy_iterator()


def pipeline_rate(data_cfg: Any, *, batch: int, threads: int, batches: int,
                  repeats: int) -> dict[str, Any]:
  """Pairs/s of the pipeline over `repeats` rounds of `batches` batches (after the first)."""
  it = _dataset_iterator(data_cfg, batch, threads)
  with common.Stopwatch() as first:
    next(it)

  def one_round() -> float:
    with common.Stopwatch() as watch:
      for _ in range(batches):
        next(it)
    return watch.seconds

  times = common.interleave({"pipeline": one_round}, repeats)["pipeline"]
  used = threads or common.cpu_cores()
  rate = batches * batch / common.median(times)
  return {"source": data_cfg.source, "size": int(data_cfg.image_size), "batch": batch,
          "threads": used if threads else f"{used} (all)", "pairs/s": rate,
          "pairs/s/core": rate / used, "spread": common.spread(times),
          "first batch s": first.seconds, "cores": used}


def end_to_end_rate(jax_step: Any, data_cfg: Any, *, batch: int, steps: int,
                    repeats: int) -> float:
  """Images/s of the compiled step fed by the pipeline (host batch -> device each step)."""
  from dense_ssl import sharding  # pylint: disable=g-import-not-at-top
  it = _dataset_iterator(data_cfg, batch, 0)
  mesh = jax_step.mesh

  def feed() -> Iterator[dict[str, Any]]:
    while True:
      host = next(it)  # the step's keys only (the pipeline adds a skipped-file count)
      yield sharding.to_global({k: host[k] for k in jax_step.batch}, mesh)

  batches = feed()
  jax_step.run_round(1, batches=batches)  # first batch: pipeline start-up, not steady state
  times = common.interleave(
      {"e2e": lambda: jax_step.run_round(steps, batches=batches)}, repeats)["e2e"]
  return steps * batch / common.median(times)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sources", default="demo,folder", help="comma list of demo, folder")
  p.add_argument("--folder", default="",
                 help="a folder of images for source=folder (default: write --num_jpegs JPEGs "
                      "to a temporary directory)")
  p.add_argument("--num_jpegs", type=int, default=64)
  p.add_argument("--size", type=int, default=224, help="view side in pixels")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--batches", type=int, default=8, help="batches per timed round")
  p.add_argument("--repeats", type=int, default=3, help="timed rounds (median)")
  p.add_argument("--threads", default="1,0",
                 help="comma list of tf.data thread-pool sizes; 0 = all cores")
  p.add_argument("--step", action=argparse.BooleanOptionalAction, default=True,
                 help="also time the training step at the same size and batch")
  p.add_argument("--end_to_end", action=argparse.BooleanOptionalAction, default=False,
                 help="also time the step fed by the pipeline")
  p.add_argument("--method", default="densecl")
  p.add_argument("--model", default="resnet18")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--queue", type=int, default=65536)
  p.add_argument("--bn", default="shuffle", choices=("shuffle", "sync", "none"))
  p.add_argument("--hidden", type=int, default=None)
  p.add_argument("--dim", type=int, default=None)
  p.add_argument("--step_repeats", type=int, default=3)
  p.add_argument("--step_iters", type=int, default=1)
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Prints the pipeline table, the step's rate and the verdict; returns the numbers."""
  args = parse_args(argv)
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  except ModuleNotFoundError as error:
    raise SystemExit("benchmarks/data.py measures the tf.data pipeline and needs TensorFlow "
                     "(pip install tensorflow-cpu); step.py and peer_torch.py do not.") from error
  import jax  # pylint: disable=g-import-not-at-top
  print(common.machine_header(jax.devices()))
  rows = []
  with tempfile.TemporaryDirectory(prefix="dense_ssl_jpegs_") as tmp:
    folder = args.folder
    if "folder" in args.sources and not folder:
      write_jpegs(tmp, args.num_jpegs)
      folder = tmp
      print(f"# wrote {args.num_jpegs} JPEGs of {JPEG_SHAPE[1]}x{JPEG_SHAPE[0]} (some "
            f"portrait) to {tmp}")
    for source in common.parse_list(args.sources):
      cfg = data_config(source, args.size, folder if source == "folder" else "")
      for threads in common.parse_list(args.threads, int):
        rows.append(pipeline_rate(cfg, batch=args.batch, threads=threads,
                                  batches=args.batches, repeats=args.repeats))
    print(common.table(rows, COLUMNS))

    out: dict[str, Any] = {"pipeline": rows, "step": None, "end_to_end": None}
    if not args.step:
      return out
    from benchmarks import step as step_lib  # pylint: disable=g-import-not-at-top
    spec = step_lib.StepSpec(method=args.method, model=args.model, size=args.size,
                             batch=args.batch, dtype=args.dtype, queue=args.queue,
                             bn=args.bn, hidden=args.hidden, dim=args.dim)
    print(f"# timing the {args.method} step on {spec.label} ...", flush=True)
    jax_step = step_lib.JaxStep(spec)
    times = common.interleave({"step": lambda: jax_step.run_round(args.step_iters)},
                              args.step_repeats)["step"]
    step_rate = args.step_iters * args.batch / common.median(times)
    out["step"] = step_rate
    print(f"step {args.method} {spec.label}: {common.fmt(step_rate)} img/s "
          f"(synthetic batch on device)")
    if args.end_to_end:
      source = common.parse_list(args.sources)[-1]
      cfg = data_config(source, args.size, folder if source == "folder" else "")
      e2e = end_to_end_rate(jax_step, cfg, batch=args.batch, steps=args.step_iters,
                            repeats=args.step_repeats)
      out["end_to_end"] = e2e
      print(f"step fed by the {source} pipeline: {common.fmt(e2e)} img/s")

  for row in rows:
    need = step_rate / row["pairs/s/core"]
    limit = "pipeline" if row["pairs/s"] < step_rate else "step"
    print(f"{row['source']} with {row['threads']} thread(s): pipeline "
          f"{common.fmt(row['pairs/s'])} pairs/s vs step {common.fmt(step_rate)} img/s -> "
          f"bottleneck: {limit}; cores needed to feed the step: {common.fmt(need)}")
  if jax.devices()[0].platform == "cpu":
    print("# on a CPU-only machine the step and the pipeline share the same cores, so the "
          "two rates do not add up; the end-to-end rate (--end_to_end) is the real one.")
  return out


if __name__ == "__main__":
  main()
