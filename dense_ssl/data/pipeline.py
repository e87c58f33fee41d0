"""The training input pipeline: a deterministic, resumable tf.data graph of two-view batches.

Data flow (per process):

    global positions of this process's rows of step t, t = start_step, start_step + 1, ...
      -> image index: epoch e = pos // N, then a seeded permutation of [0, N) for epoch e
         (`tf.random.experimental.index_shuffle`, O(1) per position, nothing materialised)
      -> source.load(index): decode (parallel map, AUTOTUNE, ordered)
      -> views.make_views(image, seed(pos), the method's views): random resized crops + flips
         and their geometry (correspondence grids, boxes, token masks), chosen by the
         method's crop sampler (host geometry; colour augmentation happens later, on device,
         in `augment.py`, each view by its preset)
      -> batch(b) -> prefetch -> numpy dicts via `Batches`.

Determinism guarantees:
  * Global position pos = t * B + r is row r of global batch t (B = global batch size).
    Which image it holds and its crops/flips are stateless functions of (seed, pos) alone,
    so the global batch at step t depends only on (data config, seed, t).
  * Process p of P reads rows [p * b, (p + 1) * b), b = B / P, of every global batch: the
    processes together read each position once, and their slices concatenated equal the
    1-process batch.
  * Every op is deterministic (ordered parallel map and batch, stateless random ops), so the
    batches are bitwise identical from run to run and after a kill and resume.
  * Resume: `start_step=t` starts the position counter at t * B; for random-access sources
    ('demo', 'folder', 'synthetic', tfds prepared as array_record) this is index arithmetic and
    costs nothing. tfds datasets prepared as tfrecord can only be read in order: they produce
    one fixed global order per epoch (seeded file order, ordered interleave, a shuffle buffer
    of `data.shuffle_buffer` with a per-epoch seed), and resuming reads without decoding the
    records of the current epoch before the start; each process reads the whole stream and
    decodes only its own rows. Prepare with file_format='array_record' to avoid both costs.
  * Undecodable files in a folder are replaced by the next good file (see `sources.py`), so
    they never shift the order; `Batches.skipped_images` counts them (from 0 at each start).
    The one exception, a JPEG with intact end markers but damaged headers under the default
    TensorFlow decoder, stops the run with an error naming `config.data.folder_decoder`.
  * Epochs wrap forever, each with its own seeded order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from dense_ssl.data import instances  # pylint: disable=unused-import  (registers its sampler)
from dense_ssl.data import sources as sources_lib
from dense_ssl.data import spec
from dense_ssl.data import views as views_lib

# Per-example count of skipped files; `Batches` removes it from the batch dict.
_SKIPPED = "_skipped_images"


def hide_accelerators_from_tf() -> None:
  """Keeps TensorFlow off GPUs so that JAX owns all accelerator memory."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    # TF's devices were already initialised (by main.py, which hides them first, or by the
    # caller); visibility can no longer change and the earlier choice stands.
    pass


def image_index(position: tf.Tensor, num_examples: int, seed: int) -> tf.Tensor:
  """Which example global position `position` reads: epoch-wise seeded permutations."""
  epoch = position // num_examples
  return tf.random.experimental.index_shuffle(
      position % num_examples, sources_lib.fold_seed(seed, sources_lib.ORDER_STREAM, epoch),
      tf.constant(num_examples - 1, tf.int64))


def build_dataset(source: sources_lib.Source, data_cfg: Any, *,
                  views: Sequence[spec.ViewSpec], sampler: str = "independent",
                  global_batch_size: int,
                  seed: int, start_step: int, process_index: int,
                  process_count: int) -> tf.data.Dataset:
  """The per-process dataset of batches (dict of tensors, plus the skipped-file counts)."""
  local = global_batch_size // process_count
  first_row = process_index * local

  def example(position: tf.Tensor, image: tf.Tensor, skipped: tf.Tensor,
              extras: dict[str, tf.Tensor] | None = None) -> dict[str, Any]:
    view_seed = sources_lib.fold_seed(seed, sources_lib.VIEWS_STREAM, position)
    out = views_lib.make_views(image, view_seed, views, sampler=sampler, extras=extras)
    out[_SKIPPED] = skipped
    return out

  # The functions below are plain graph code (no Python control flow on tensors): skipping
  # autograph's source conversion makes building the pipeline several times faster.
  if source.random_access:

    @tf.autograph.experimental.do_not_convert
    def load(counter: tf.Tensor) -> dict[str, Any]:
      step, row = counter // local, counter % local
      position = step * global_batch_size + first_row + row
      index = image_index(position, source.num_examples, seed)
      image, skipped = source.load(index)
      # Per-image arrays for the crop sampler (e.g. object proposals), looked up by index.
      extras = source.extras(index) if source.extras is not None else None
      return example(position, image, skipped, extras)

    ds = tf.data.Dataset.counter(start_step * local).map(
        load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  else:
    start = start_step * global_batch_size
    ds = tf.data.Dataset.zip(tf.data.Dataset.counter(start), source.stream(seed, start))
    ds = ds.filter(tf.autograph.experimental.do_not_convert(
        lambda position, _: (position % global_batch_size) // local == process_index))

    @tf.autograph.experimental.do_not_convert
    def decode(position: tf.Tensor, record: tf.Tensor) -> dict[str, Any]:
      return example(position, *source.decode(record))

    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  ds = ds.batch(local, drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
  options = tf.data.Options()
  options.deterministic = True
  ds = ds.with_options(options)
  return ds.prefetch(int(data_cfg.prefetch))


class Batches(Iterator[dict[str, np.ndarray]]):
  """Infinite iterator of this process's batches (dicts of numpy arrays).

  Attributes:
    dataset: the underlying `tf.data.Dataset` (for inspection or benchmarks).
    num_examples: size of one epoch of the source.
    skipped_images: undecodable files passed over so far in the batches returned by this
      process (counted each time one is met, so once per epoch).
    element_spec: {key: (shape, numpy dtype)} of one of this process's batches (what the
      trainer initialises the method with).
  """

  def __init__(self, dataset: tf.data.Dataset, *, num_examples: int):
    self.dataset = dataset
    self.num_examples = num_examples
    self.skipped_images = 0
    self.element_spec = {k: (tuple(v.shape), v.dtype.as_numpy_dtype)
                         for k, v in dataset.element_spec.items() if k != _SKIPPED}
    self._iterator = dataset.as_numpy_iterator()

  def __iter__(self) -> Batches:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    try:
      batch = next(self._iterator)
    except tf.errors.InvalidArgumentError as error:
      # Sources skip undecodable files; what reaches here is a JPEG that looked complete to
      # the folder source's TensorFlow decoder (sources.folder) but is damaged inside.
      raise ValueError(
          f"The input pipeline could not decode an image ({error.message.splitlines()[0]}). "
          "If config.data.source='folder', a JPEG file there is damaged inside: set "
          "--config.data.folder_decoder=pil (PIL decodes every file and skips the ones it "
          "cannot) or remove the file.") from error
    self.skipped_images += int(batch.pop(_SKIPPED).sum())
    return batch


def create_iterator(data_cfg: Any, *, views: Sequence[spec.ViewSpec], global_batch_size: int,
                    seed: int, sampler: str = "independent", start_step: int = 0,
                    process_index: int | None = None,
                    process_count: int | None = None) -> Batches:
  """The training batches of this process, starting at `start_step`.

  Args:
    data_cfg: `config.data` (source, data_dir, folder, split, shuffle_buffer,
      demo_num_images, prefetch, ...).
    views: the method's views (`Method.views()`).
    global_batch_size: examples per step over all processes.
    seed: the data seed; with the config and the step it fixes every batch.
    sampler: the method's crop sampler (`Method.crop_sampler`).
    start_step: the first step to produce (resume).
    process_index, process_count: this process and the number of processes; default to
      `jax.process_index()` and `jax.process_count()`.

  Returns:
    `Batches`, whose `next()` is a dict of numpy arrays with the keys of
    `dense_ssl.data.spec.batch_shapes(views, b)`, b = global_batch_size // process_count.
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top  (only to ask which process this is)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                     f"the number of processes ({process_count}); change config.batch_size.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must lie in [0, {process_count}).")
  if start_step < 0:
    raise ValueError(f"Need start_step >= 0, got {start_step}.")
  spec.check_views(views)
  views_lib.sampler_keys(sampler, views)  # a clear error for an unknown sampler
  hide_accelerators_from_tf()
  source = sources_lib.create(data_cfg)
  dataset = build_dataset(source, data_cfg, views=views, sampler=sampler,
                          global_batch_size=global_batch_size, seed=seed,
                          start_step=start_step, process_index=process_index,
                          process_count=process_count)
  return Batches(dataset, num_examples=source.num_examples)
