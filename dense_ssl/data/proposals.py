"""Unsupervised object proposals per image, computed once, before training, into a sidecar.

    python -m dense_ssl.data.proposals --config=configs/univip.py:demo [--workers=2]

UniVIP (and ORL before it) crops object instances from the proposals of selective search.
Selective search costs about a second per COCO image, so it never runs in the training loop:
this command runs it over every image of the config's data source (OpenCV contrib's
`ximgproc.segmentation`, "fast" mode, one thread per worker process, `--workers` processes),
filters the boxes as ORL does and writes them to a sidecar file next to the dataset:

  * kept: aspect ratio w/h in [1/3, 3], both sides >= `data.proposal_min_side` pixels of the
    original image (64 for COCO), then greedily in selective search's order every box whose
    IoU with each box kept so far is <= 0.5; at most `MAX_PER_IMAGE` per image.
  * format: one `.npz` with `boxes` (total, 4) float32 (y0, x0, y1, x1) normalised to the
    image, `offsets` (N + 1,) int64 (image i's boxes are rows offsets[i]:offsets[i + 1]),
    and the provenance (`kind`, `source`, `num_examples`, `min_side`). Every host reads the
    whole file (numpy through tf.io.gfile, so gs:// works) and the tf.data graph indexes it by
    image index; a COCO train2017 sidecar is 118k images x <= 64 boxes x 16 bytes.
  * resumable: the images are done in chunks, each written atomically to `<sidecar>.parts/`;
    a rerun skips the chunks that exist and the last step merges them.

The Fashion-MNIST scenes also know their garments' boxes (`data.proposals="garments"`), which
need no sidecar; `data.proposals="selective_search"` (the default) reads the sidecar.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from dense_ssl import extras

KINDS = ("selective_search", "garments")
MAX_PER_IMAGE = 64
IOU_THRESHOLD = 0.5
ASPECT_RANGE = (1 / 3, 3.0)
_COMMAND = "python -m dense_ssl.data.proposals --config=<the same config and overrides>"


# ---------------------------------------------------------------------------------------------
# Boxes: selective search and ORL's filter (pure numpy, pixels (y0, x0, y1, x1)).
# ---------------------------------------------------------------------------------------------


def _seed_c_rand(seed: int) -> None:
  """OpenCV's selective search ranks regions with C's rand(), not cv::RNG: seeding it makes the
  boxes a function of (image, seed), so a resumed run writes what an uninterrupted one did."""
  import ctypes  # pylint: disable=g-import-not-at-top
  try:
    ctypes.CDLL(None).srand(ctypes.c_uint(seed % 2**32))
  except (OSError, AttributeError):  # no C library symbols here (Windows): order unseeded
    pass


def selective_search(image: np.ndarray, seed: int = 0) -> np.ndarray:
  """OpenCV's selective search ("fast" mode) of an RGB uint8 image: (P, 4) float32 pixel boxes
  (y0, x0, y1, x1), in the order it ranks them (its random ranking seeded by `seed`)."""
  cv2 = extras.require("cv2", "Selective search (python -m dense_ssl.data.proposals)")
  _seed_c_rand(seed)
  search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
  search.setBaseImage(np.ascontiguousarray(image[..., ::-1]))  # OpenCV images are BGR
  search.switchToSelectiveSearchFast()
  rects = np.asarray(search.process(), np.float32).reshape(-1, 4)  # (x, y, w, h)
  return np.stack([rects[:, 1], rects[:, 0], rects[:, 1] + rects[:, 3],
                   rects[:, 0] + rects[:, 2]], axis=1)


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """(A, B) intersection over union of two sets of (y0, x0, y1, x1) boxes."""
  y0 = np.maximum(a[:, None, 0], b[None, :, 0])
  x0 = np.maximum(a[:, None, 1], b[None, :, 1])
  y1 = np.minimum(a[:, None, 2], b[None, :, 2])
  x1 = np.minimum(a[:, None, 3], b[None, :, 3])
  inter = np.clip(y1 - y0, 0, None) * np.clip(x1 - x0, 0, None)
  area = lambda r: (r[:, 2] - r[:, 0]) * (r[:, 3] - r[:, 1])
  union = area(a)[:, None] + area(b)[None, :] - inter
  return inter / np.maximum(union, 1e-9)


def filter_boxes(boxes: np.ndarray, min_side: float, *, iou_threshold: float = IOU_THRESHOLD,
                 aspect: Sequence[float] = ASPECT_RANGE,
                 max_boxes: int = MAX_PER_IMAGE) -> np.ndarray:
  """ORL's filter of pixel boxes (y0, x0, y1, x1): aspect ratio w/h in `aspect`, both sides
  >= `min_side`, then each box (in the given order) kept if its IoU with every kept box is
  <= `iou_threshold`; at most `max_boxes`."""
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  h, w = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
  ratio = w / np.maximum(h, 1e-9)
  ok = (h >= min_side) & (w >= min_side) & (ratio >= aspect[0]) & (ratio <= aspect[1])
  kept: list[np.ndarray] = []
  for box in boxes[ok]:
    if len(kept) >= max_boxes:
      break
    if not kept or np.all(iou(box[None], np.stack(kept))[0] <= iou_threshold):
      kept.append(box)
  return np.stack(kept) if kept else np.zeros((0, 4), np.float32)


def normalise(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
  """Pixel boxes -> (y0, x0, y1, x1) as fractions of the image, float32."""
  return (np.asarray(boxes, np.float32).reshape(-1, 4) /
          np.asarray([height, width, height, width], np.float32))


# ---------------------------------------------------------------------------------------------
# The sidecar.
# ---------------------------------------------------------------------------------------------


def _dataset_id(data_cfg: Any) -> str:
  """What fixes a source's images (its name and sizes), for sidecar names and checks."""
  source = data_cfg.source
  if source == "demo":
    return f"demo-{int(data_cfg.demo_num_images)}"
  if source == "fmnist_scenes":
    pool = int(data_cfg.scenes_background_pool)
    return (f"fmnist_scenes-{int(data_cfg.scenes_num_images)}-{int(data_cfg.scenes_size)}"
            + (f"-bg{pool}" if pool else "")
            + ("" if data_cfg.scenes_tint else "-grey"))
  if source == "folder":
    return "folder"
  return f"{source}-{data_cfg.split}".replace("[", "_").replace("]", "").replace(":", "_")


def sidecar_path(data_cfg: Any) -> str:
  """`data.proposals_path`, or the default next to the dataset: inside an image folder, under
  `data_dir/proposals/` for tfds sources, under ~/.cache/dense_ssl/proposals for the sources
  made in memory (demo photos, Fashion-MNIST scenes)."""
  explicit = data_cfg.get("proposals_path", "")
  if explicit:
    return explicit
  name = f"{_dataset_id(data_cfg)}.{KINDS[0]}.npz"
  if data_cfg.source == "folder":
    return os.path.join(data_cfg.folder, name)
  if data_cfg.source in ("demo", "fmnist_scenes", "synthetic"):
    return os.path.join(os.path.expanduser("~/.cache/dense_ssl/proposals"), name)
  root = data_cfg.data_dir or os.path.expanduser("~/tensorflow_datasets")
  return os.path.join(root, "proposals", name)


def _save_npz(path: str, **arrays: Any) -> None:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (gfile: local or gs:// paths)
  buffer = io.BytesIO()  # zip writing seeks, which GFile's writers cannot
  np.savez(buffer, **arrays)
  tmp = f"{path}.tmp-{os.getpid()}"
  with tf.io.gfile.GFile(tmp, "wb") as f:
    f.write(buffer.getvalue())
  tf.io.gfile.rename(tmp, path, overwrite=True)  # atomic: a killed run leaves no half file


def _load_npz(path: str) -> dict[str, np.ndarray]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  with tf.io.gfile.GFile(path, "rb") as f:
    with np.load(io.BytesIO(f.read()), allow_pickle=False) as data:
      return {k: data[k] for k in data.files}


def pack(per_image: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """Per-image (P_i, 4) boxes -> (boxes (total, 4) float32, offsets (N + 1,) int64)."""
  counts = np.asarray([len(b) for b in per_image], np.int64)
  offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
  boxes = (np.concatenate([np.asarray(b, np.float32).reshape(-1, 4) for b in per_image])
           if per_image else np.zeros((0, 4), np.float32))
  return boxes, offsets


def read_sidecar(data_cfg: Any, num_examples: int) -> tuple[np.ndarray, np.ndarray]:
  """(boxes, offsets) of the config's sidecar; a clear error naming the command if missing."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  path = sidecar_path(data_cfg)
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(
        f"No object proposals for config.data.source={data_cfg.source!r} at {path!r} "
        f"(config.data.proposals_path; config.data.proposals='selective_search'). Compute them "
        f"once, before training: {_COMMAND} (a progress bar; resumable).")
  data = _load_npz(path)
  if int(data["num_examples"]) != num_examples:
    raise ValueError(f"The proposals at {path!r} are for {int(data['num_examples'])} images but "
                     f"config.data gives {num_examples}; rerun {_COMMAND}.")
  return data["boxes"], data["offsets"]


# ---------------------------------------------------------------------------------------------
# Reading a source's images on the host, in index order.
# ---------------------------------------------------------------------------------------------


def read_images(data_cfg: Any, start: int, end: int) -> list[np.ndarray]:
  """Images start .. end - 1 of the config's source, as the pipeline's `load(index)` gives them.

  The Fashion-MNIST scenes are drawn directly (numpy, a chunk at a time); other sources are
  read through their `Source.load` eagerly.
  """
  if data_cfg.source == "fmnist_scenes":
    from dense_ssl.data import sources  # pylint: disable=g-import-not-at-top
    return list(sources.pretrain_scenes(data_cfg, end - start, start)["images"])
  source = _source(data_cfg)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return [source.load(tf.constant(i, tf.int64))[0].numpy() for i in range(start, end)]


_SOURCES: dict[str, Any] = {}


def _source(data_cfg: Any) -> Any:
  from dense_ssl.data import sources  # pylint: disable=g-import-not-at-top
  key = repr(sorted(data_cfg.items()))
  if key not in _SOURCES:
    _SOURCES[key] = sources.create_images(data_cfg)
  return _SOURCES[key]


def num_images(data_cfg: Any) -> int:
  if data_cfg.source == "fmnist_scenes":
    return int(data_cfg.scenes_num_images)
  return _source(data_cfg).num_examples


# ---------------------------------------------------------------------------------------------
# The command.
# ---------------------------------------------------------------------------------------------


def _chunk(args: tuple[Any, int, int, str]) -> tuple[int, float]:
  """Computes and writes one chunk's part file; returns (images, CPU seconds of the search
  and filter: per core, and unaffected by other jobs sharing the machine)."""
  plain, start, end, part = args
  cv2 = extras.require("cv2", "Selective search (python -m dense_ssl.data.proposals)")
  import ml_collections  # pylint: disable=g-import-not-at-top
  data_cfg = ml_collections.ConfigDict(plain)
  cv2.setNumThreads(1)  # one core per worker process: --workers sets the parallelism
  images = read_images(data_cfg, start, end)
  t0 = time.process_time()
  min_side = float(data_cfg.proposal_min_side)
  out = [normalise(filter_boxes(selective_search(im, seed=start + i), min_side), *im.shape[:2])
         for i, im in enumerate(images)]
  seconds = time.process_time() - t0
  boxes, offsets = pack(out)
  _save_npz(part, boxes=boxes, offsets=offsets, start=np.int64(start), end=np.int64(end),
            seconds=np.float64(seconds))
  return end - start, seconds


def compute(data_cfg: Any, *, workers: int = 1, chunk: int = 64,
            progress: bool = True) -> dict[str, Any]:
  """Runs selective search over the whole source into its sidecar (see the module docstring).

  Returns {"path", "images", "boxes", "search_seconds" (summed over workers, this run's
  chunks), "wall_seconds", "workers", "chunks_done_before", "images_done" (this run)}.
  """
  import multiprocessing  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  path = sidecar_path(data_cfg)
  parts_dir = f"{path}.parts"
  tf.io.gfile.makedirs(parts_dir)
  total = num_images(data_cfg)
  plain = data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else dict(data_cfg)
  jobs = []
  for start in range(0, total, chunk):
    end = min(start + chunk, total)
    part = os.path.join(parts_dir, f"part-{start:09d}-{end:09d}.npz")
    if not tf.io.gfile.exists(part):
      jobs.append((plain, start, end, part))
  done_before = -(-total // chunk) - len(jobs)
  t0 = time.perf_counter()
  searched = 0.0
  bar = None
  if progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=total, initial=done_before * chunk if jobs else total, unit="img",
               desc="selective search")
  if jobs:
    # spawn: TensorFlow and JAX state must not be forked into the workers.
    with multiprocessing.get_context("spawn").Pool(max(1, workers)) as pool:
      for n, seconds in pool.imap_unordered(_chunk, jobs):
        searched += seconds
        if bar is not None:
          bar.update(n)
  if bar is not None:
    bar.close()
  wall = time.perf_counter() - t0
  per_image, parts = [None] * total, sorted(tf.io.gfile.listdir(parts_dir))
  for name in parts:
    data = _load_npz(os.path.join(parts_dir, name))
    start, offsets = int(data["start"]), data["offsets"]
    for i in range(int(data["end"]) - start):
      per_image[start + i] = data["boxes"][offsets[i]:offsets[i + 1]]
  missing = [i for i, b in enumerate(per_image) if b is None]
  if missing:
    raise RuntimeError(f"{len(missing)} images have no proposals in {parts_dir}; rerun.")
  boxes, offsets = pack(per_image)
  _save_npz(path, boxes=boxes, offsets=offsets, num_examples=np.int64(total),
            kind=np.asarray(KINDS[0]), source=np.asarray(_dataset_id(data_cfg)),
            min_side=np.float64(data_cfg.proposal_min_side))
  return {"path": path, "images": total, "boxes": int(len(boxes)), "search_seconds": searched,
          "wall_seconds": wall, "workers": workers, "chunks_done_before": done_before,
          "images_done": sum(end - start for _, start, end, _ in jobs)}


def main(argv: Sequence[str]) -> None:
  """The command line (module docstring)."""
  del argv
  result = compute(_CONFIG.value.data, workers=_WORKERS.value, chunk=_CHUNK.value)
  done = result["images_done"]
  per_image = result["search_seconds"] / max(done, 1)
  print(f"{result['images']} images, {result['boxes']} proposals "
        f"({result['boxes'] / max(result['images'], 1):.1f} per image) -> {result['path']}")
  if done > 0:
    print(f"this run: {done} images in {result['wall_seconds']:.1f} s wall on "
          f"{result['workers']} worker(s): {per_image * 1e3:.1f} ms of search CPU time per image "
          f"(one core), {done / max(result['wall_seconds'], 1e-9):.2f} images/s")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Training config (its data block).")
  _WORKERS = flags.DEFINE_integer("workers", os.cpu_count() or 1, "Worker processes.")
  _CHUNK = flags.DEFINE_integer("chunk", 64, "Images per resumable part file.")
  flags.mark_flags_as_required(["config"])
  app.run(main)
