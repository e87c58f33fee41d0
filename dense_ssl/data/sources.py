"""Data sources by name: where images come from, before any view geometry.

A `Source` gives the pipeline one of two kinds of access to `num_examples` images:
  * random access, `load(index) -> (image, skipped)`: the pipeline picks which index each
    global position reads (a seeded permutation per epoch), so any step can be started at
    with index arithmetic. 'demo', 'folder', 'synthetic' and tfds datasets prepared in the
    array_record format work this way.
  * sequential, `stream(seed, start_position) -> records` in one fixed global order plus
    `decode(record) -> (image, skipped)`: tfds datasets prepared as tfrecord (the tfds default),
    which cannot be read at random. The order is a seeded file shuffle per epoch, a
    deterministic interleave and a seeded shuffle buffer; starting at a position skips the
    raw (undecoded) records before it.

`image` is uint8 (H, W, 3); `skipped` is an int32 count of undecodable files that were passed
over to produce it (only the 'folder' source has any).

Sources register themselves by name; `create(data_cfg)` builds the one named by
`data_cfg.source`.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
from typing import Any, Callable

from absl import logging
import numpy as np
from PIL import Image
import tensorflow as tf

from dense_ssl import extras, registry
from dense_ssl.data import proposals as proposals_lib

Decoded = tuple[tf.Tensor, tf.Tensor]

# Tags that separate the random streams derived from the one training seed.
ORDER_STREAM = 1
VIEWS_STREAM = 2

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
# The ImageNet train split size: the nominal epoch of the synthetic source, so that durations
# given in epochs mean the same as on ImageNet in benchmarks.
_SYNTHETIC_EPOCH = 1_281_167
_SYNTHETIC_POOL = 64
# Demo photos are shrunk to this longest side before crops are cut (keeps memory ~12 MB).
_DEMO_MAX_SIDE = 512
_DEMO_MIN_SIDE = 48
_DEMO_DATA_SEED = 20240601  # the demo set is a fixed dataset, independent of the run's seed


@dataclasses.dataclass(frozen=True)
class Source:
  """What the pipeline needs from a data source (see the module docstring).

  `extras(index)`, for random-access sources, gives per-image arrays that the method's crop
  sampler reads (e.g. {"proposals": (P, 4)} object boxes, `with_proposals`). `known_boxes()`
  gives, per image, boxes the source itself knows (pixel (y0, x0, y1, x1); the Fashion-MNIST
  scenes' garments), which can stand in for proposals.
  """
  name: str
  num_examples: int
  load: Callable[[tf.Tensor], Decoded] | None = None
  stream: Callable[[int, int], tf.data.Dataset] | None = None
  decode: Callable[[tf.Tensor], Decoded] | None = None
  extras: Callable[[tf.Tensor], dict[str, tf.Tensor]] | None = None
  known_boxes: Callable[[], list[np.ndarray]] | None = None

  @property
  def random_access(self) -> bool:
    return self.load is not None


_REGISTRY: registry.Registry[Callable[[Any], Source]] = registry.Registry(
    "data source", "config.data.source")
# Function decorator: makes a source factory `fn(data_cfg) -> Source` available by name.
register = _REGISTRY.register
names = _REGISTRY.names


def create_images(data_cfg: Any) -> Source:
  """The images of the source named by `data_cfg.source`, without per-image extras."""
  return _REGISTRY.get(data_cfg.source)(data_cfg)


def create(data_cfg: Any) -> Source:
  """Builds the source named by `data_cfg.source`, with the proposals `data_cfg.proposals`
  names (if any) as its extras."""
  return with_proposals(create_images(data_cfg), data_cfg)


def with_proposals(source: Source, data_cfg: Any) -> Source:
  """`source` with extras {"proposals": (P, 4) float32 normalised (y0, x0, y1, x1)} per image.

  `data_cfg.proposals`: "" (none), "selective_search" (the sidecar that
  `python -m dense_ssl.data.proposals` writes, see `dense_ssl.data.proposals`) or "garments"
  (the boxes the source knows, filtered by the same rules as the sidecar's).
  """
  kind = data_cfg.get("proposals", "") if hasattr(data_cfg, "get") else ""
  if not kind:
    return source
  if kind not in proposals_lib.KINDS:
    raise ValueError(f"Unknown config.data.proposals={kind!r}; valid choices: '', "
                     f"{', '.join(proposals_lib.KINDS)}.")
  if not source.random_access:
    raise ValueError(f"config.data.proposals={kind!r} needs a random-access source (images "
                     f"looked up by index); config.data.source={data_cfg.source!r} streams its "
                     f"records: prepare it with file_format='array_record'.")
  if kind == "garments":
    if source.known_boxes is None:
      raise ValueError(f"config.data.proposals='garments' needs a source that knows its objects' "
                       f"boxes (config.data.source='fmnist_scenes'), not {data_cfg.source!r}.")
    size = float(data_cfg.scenes_size)
    min_side = float(data_cfg.proposal_min_side)
    per_image = [proposals_lib.normalise(proposals_lib.filter_boxes(b, min_side), size, size)
                 for b in source.known_boxes()]
    boxes, offsets = proposals_lib.pack(per_image)
  else:
    boxes, offsets = proposals_lib.read_sidecar(data_cfg, source.num_examples)
  boxes, offsets = tf.constant(boxes, tf.float32), tf.constant(offsets, tf.int64)
  base = source.extras

  def extras(index: tf.Tensor) -> dict[str, tf.Tensor]:
    out = dict(base(index)) if base is not None else {}
    index = tf.cast(index, tf.int64)
    out["proposals"] = boxes[offsets[index]:offsets[index + 1]]
    return out

  return dataclasses.replace(source, extras=extras)


def _no_skips() -> tf.Tensor:
  return tf.constant(0, tf.int32)


def fold_seed(seed: int | tf.Tensor, stream: int, data: tf.Tensor) -> tf.Tensor:
  """The stateless seed for `data` (an epoch, a position) in one random stream (int64, [2])."""
  base = tf.stack([tf.cast(seed, tf.int64), tf.constant(stream, tf.int64)])
  return tf.random.experimental.stateless_fold_in(base, tf.cast(data, tf.int64))


def as_rgb(array: np.ndarray) -> np.ndarray:
  """(H, W) or (H, W, 1|3|4) uint8 -> (H, W, 3) uint8: grey replicated, alpha dropped."""
  if array.ndim == 2:
    array = array[..., None]
  if array.shape[-1] == 1:
    array = np.repeat(array, 3, axis=-1)
  return np.ascontiguousarray(array[..., :3])


# ---------------------------------------------------------------------------------- demo ---


@functools.lru_cache(maxsize=1)  # decoding and shrinking them takes a second or two
def demo_photos() -> tuple[np.ndarray, ...]:
  """The real photographs shipped with scikit-image (CC0), as read-only RGB uint8 arrays.

  Grey photos are replicated to RGB and every photo is shrunk to at most 512 pixels per side.
  Synthetic or drawn images in `skimage.data` (logo, phantom, text, checkerboards ...) are left
  out: self-supervised features learned from them say little.
  """
  skimage_data = extras.require("skimage.data", "data.source=demo (the embedded photos)")
  loaders = (
      skimage_data.astronaut, skimage_data.chelsea, skimage_data.coffee, skimage_data.rocket,
      lambda: skimage_data.stereo_motorcycle()[0], lambda: skimage_data.stereo_motorcycle()[1],
      skimage_data.hubble_deep_field, skimage_data.retina, skimage_data.immunohistochemistry,
      skimage_data.brick, skimage_data.grass, skimage_data.gravel, skimage_data.camera,
      skimage_data.coins, skimage_data.moon)
  photos = []
  for load in loaders:
    image = Image.fromarray(as_rgb(load()))
    image.thumbnail((_DEMO_MAX_SIDE, _DEMO_MAX_SIDE), Image.Resampling.LANCZOS)
    photo = np.array(image)
    photo.flags.writeable = False
    photos.append(photo)
  return tuple(photos)


def demo_crop_table(photo_shapes: list[tuple[int, int]], num: int,
                    seed: int = _DEMO_DATA_SEED) -> np.ndarray:
  """`num` random crops (photo, y0, x0, h, w) of the photos, a fixed function of `seed`.

  Crops cover 10-60% of a photo's area with aspect ratios in [3/4, 4/3] and at least 48
  pixels per side, so they look like small, varied photographs.
  """
  rng = np.random.default_rng(seed)
  table = np.zeros((num, 5), np.int32)
  for k in range(num):
    photo = rng.integers(len(photo_shapes))
    height, width = photo_shapes[photo]
    area = height * width * rng.uniform(0.1, 0.6)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    h = int(np.clip(round(np.sqrt(area / aspect)), min(_DEMO_MIN_SIDE, height), height))
    w = int(np.clip(round(np.sqrt(area * aspect)), min(_DEMO_MIN_SIDE, width), width))
    table[k] = (photo, rng.integers(height - h + 1), rng.integers(width - w + 1), h, w)
  return table


@register("demo")
def demo(data_cfg: Any) -> Source:
  """`data_cfg.demo_num_images` random crops of the scikit-image photos, held in memory.

  The photos are kept once (about 12 MB); crop k is cut on the fly from a fixed table, so the
  set costs nothing per image and is the same for every run and every process.
  """
  num = int(data_cfg.demo_num_images)
  if num < 1:
    raise ValueError(f"config.data.demo_num_images must be >= 1, got {num}.")
  photos = demo_photos()
  stack = np.zeros((len(photos), _DEMO_MAX_SIDE, _DEMO_MAX_SIDE, 3), np.uint8)
  for i, photo in enumerate(photos):
    stack[i, :photo.shape[0], :photo.shape[1]] = photo
  stack = tf.constant(stack)
  table = tf.constant(demo_crop_table([p.shape[:2] for p in photos], num))

  def load(index: tf.Tensor) -> Decoded:
    photo, y0, x0, h, w = tf.unstack(tf.gather(table, index))
    return tf.slice(stack[photo], tf.stack([y0, x0, 0]), tf.stack([h, w, 3])), _no_skips()

  return Source(name="demo", num_examples=num, load=load)


# ------------------------------------------------------------------------------- folder ---


def list_images(folder: str) -> list[str]:
  """All image files under `folder` (recursive, sorted, so every process sees one order)."""
  paths = []
  for root, _, files in tf.io.gfile.walk(folder):
    paths.extend(os.path.join(root, f) for f in files
                 if f.lower().endswith(IMAGE_EXTENSIONS))
  return sorted(paths)


def decode_image_bytes(data: bytes) -> np.ndarray:
  """Decodes an encoded image to RGB uint8 (H, W, 3) with PIL; raises if it cannot.

  Handles greyscale, palette, alpha, CMYK and 16-bit images (scaled to 8 bits; PIL's own
  conversion would clip them). Animated images give their first frame.
  """
  with Image.open(io.BytesIO(data)) as image:
    image.load()  # decode now, so truncated or corrupt data raises here and not later
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
      array = np.asarray(image).astype(np.float64)
      array = np.round(np.clip(array, 0, 65535) / 257.0).astype(np.uint8)
    else:
      array = np.asarray(image.convert("RGB"))
  if array.size == 0:
    raise ValueError("image has no pixels")
  return as_rgb(array)


class _FolderReader:
  """Reads file `index`; an undecodable file is replaced by the next good file in list order.

  Replacing (rather than dropping) keeps every global position filled, so the data order and
  resume by index arithmetic do not depend on where the bad files are. Each file passed over
  is logged and counted in the returned `skipped`.
  """

  def __init__(self, folder: str, paths: list[str]):
    self.folder = folder
    self.paths = paths

  def decode(self, index: int) -> np.ndarray:
    with tf.io.gfile.GFile(self.paths[index], "rb") as f:
      return decode_image_bytes(f.read())

  def __call__(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    skipped = 0
    for attempt in range(len(self.paths)):
      i = (int(index) + attempt) % len(self.paths)
      try:
        return self.decode(i), np.int32(skipped)
      # Any failure of a third-party decoder on a bad file (OSError, SyntaxError,
      # ValueError, DecompressionBombError, ...) must skip the file, never stop training.
      except Exception as error:  # pylint: disable=broad-except
        logging.warning("Skipping undecodable image %s: %s", self.paths[i], error)
        skipped += 1
    raise ValueError(f"No decodable image under {self.folder!r}.")


# How the folder source decodes: "tf" decodes complete-looking JPEGs natively in the tf.data
# graph (no GIL, so it scales with the parallel map) and hands everything else to PIL; "pil"
# decodes every file with PIL.
FOLDER_DECODERS = ("tf", "pil")
_JPEG_START = b"\xff\xd8\xff"  # SOI marker, then the first segment's marker
_JPEG_END = b"\xff\xd9"  # EOI marker


def looks_like_complete_jpeg(data: tf.Tensor) -> tf.Tensor:
  """Whether encoded bytes start like a JPEG and end with its end-of-image marker.

  Truncated files (the common corruption), other formats and junk fail this and go to PIL,
  which skips what it cannot decode; JPEGs that pass decode with TensorFlow.
  """
  length = tf.strings.length(data)
  tail = tf.strings.substr(data, tf.maximum(length - 2, 0), 2)
  return ((length >= 4) & tf.equal(tf.strings.substr(data, 0, 3), _JPEG_START) &
          tf.equal(tail, _JPEG_END))


@register("folder")
def folder(data_cfg: Any) -> Source:
  """Every jpg/jpeg/png/bmp/gif/webp file under `data_cfg.folder` (recursive), one example each.

  With `data_cfg.folder_decoder='tf'` (the default) JPEG files that end properly are decoded
  by `tf.io.decode_jpeg` (PIL's pixels exactly; 1.4x the pipeline's rate on 2 cores,
  benchmarks/data.py); other files, and every file with 'pil', are decoded by PIL (a non-JPEG
  file is then read twice), and a file that cannot be decoded is replaced by the next good one.
  A JPEG whose ending is intact but whose headers are damaged stops the run with an error that
  names this setting (see `pipeline.Batches`).
  """
  root = data_cfg.folder
  how = ("Set config.data.folder to a directory that holds image files (searched "
         f"recursively for {', '.join(IMAGE_EXTENSIONS)}).")
  if not root or not tf.io.gfile.isdir(root):
    raise FileNotFoundError(f"Image folder {root!r} does not exist. {how}")
  decoder = data_cfg.get("folder_decoder", "tf")
  if decoder not in FOLDER_DECODERS:
    raise ValueError(f"Unknown config.data.folder_decoder={decoder!r}; valid choices: "
                     f"{', '.join(FOLDER_DECODERS)}.")
  paths = list_images(root)
  if not paths:
    raise FileNotFoundError(f"Image folder {root!r} holds no image files. {how}")
  reader = _FolderReader(root, paths)
  # Fail now, not mid-run, if nothing decodes (the scan stops at the first good file).
  reader(np.int64(0))

  def load_with_pil(index: tf.Tensor) -> Decoded:
    image, skipped = tf.numpy_function(reader, [index], (tf.uint8, tf.int32), stateful=False)
    image.set_shape([None, None, 3])
    skipped.set_shape([])
    return image, skipped

  if decoder == "pil":
    return Source(name="folder", num_examples=len(paths), load=load_with_pil)
  path_table = tf.constant(paths)

  def load(index: tf.Tensor) -> Decoded:
    data = tf.io.read_file(tf.gather(path_table, index))
    return tf.cond(looks_like_complete_jpeg(data),
                   # The accurate IDCT is PIL's: both decoders give the same pixels.
                   lambda: (tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
                            _no_skips()),
                   lambda: load_with_pil(index))

  return Source(name="folder", num_examples=len(paths), load=load)


# ---------------------------------------------------------------------------- synthetic ---


# The scene set is a fixed dataset, independent of the run's seed.
SCENES_DATA_SEED = 0


def pretrain_scenes(data_cfg: Any, n: int, start: int = 0) -> dict[str, np.ndarray]:
  """Scenes start .. start + n - 1 of the pretraining set `data_cfg` describes (scenes_size,
  scenes_background_pool, scenes_tint), as `scenes.make_scenes` returns them."""
  from dense_ssl.data import scenes  # pylint: disable=g-import-not-at-top
  return scenes.make_scenes(n, SCENES_DATA_SEED, "pretrain", int(data_cfg.scenes_size),
                            start=start,
                            background_pool=int(data_cfg.scenes_background_pool),
                            tint=bool(data_cfg.scenes_tint))


@register("fmnist_scenes")
def fmnist_scenes(data_cfg: Any) -> Source:
  """Fashion-MNIST multi-object scenes (data/scenes.py, "pretrain" split: no probe garment),
  `data_cfg.scenes_num_images` of `data_cfg.scenes_size` px, made once and held in memory."""
  num = int(data_cfg.scenes_num_images)
  if num < 1:
    raise ValueError(f"config.data.scenes_num_images must be >= 1, got {num}.")
  made = pretrain_scenes(data_cfg, num)
  images = tf.constant(made["images"])

  def load(index: tf.Tensor) -> Decoded:
    return tf.gather(images, index), _no_skips()

  def garments() -> list[np.ndarray]:
    return [b[:n] for b, n in zip(made["boxes"], made["num_boxes"])]

  return Source(name="fmnist_scenes", num_examples=num, load=load, known_boxes=garments)


@register("synthetic")
def synthetic(data_cfg: Any) -> Source:
  """Random uint8 images of `data_cfg.image_size`, for benchmarks: no files, no decoding.

  A pool of 64 fixed random images stands in for a dataset of ImageNet's size.
  """
  size = int(data_cfg.image_size)
  pool = np.random.default_rng(0).integers(0, 256, (_SYNTHETIC_POOL, size, size, 3), np.uint8)
  pool = tf.constant(pool)

  def load(index: tf.Tensor) -> Decoded:
    return tf.gather(pool, index % _SYNTHETIC_POOL), _no_skips()

  return Source(name="synthetic", num_examples=_SYNTHETIC_EPOCH, load=load)


# --------------------------------------------------------------------------------- tfds ---

_IMAGENET_HELP = """\
To prepare it (once, offline): register at https://image-net.org/download-images, download
ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar, put both in {manual}, then run
  python -c "import tensorflow_datasets as tfds; tfds.builder('imagenet2012', data_dir='{root}', file_format='array_record').download_and_prepare()"
(array_record allows random access: exact resume at any step in no time; the tfds default
tfrecord also works, but resuming then reads through the epoch up to the step)."""

_COCO_HELP = """\
coco/2017 cannot be prepared on this machine: tfds downloads about 25 GB from
images.cocodataset.org, and runs here are offline. On a machine with internet run
  python -c "import tensorflow_datasets as tfds; tfds.builder('coco/2017', data_dir='DIR', file_format='array_record').download_and_prepare()"
then copy DIR/coco into {root}/ (or unpack train2017.zip and use config.data.source='folder')."""


@tf.autograph.experimental.do_not_convert  # plain graph code; saves tracing time
def _read_shard(filename: tf.Tensor, skip: tf.Tensor, take: tf.Tensor) -> tf.data.Dataset:
  return tf.data.TFRecordDataset(filename).skip(skip).take(take)


def _decode_tfds_image(encoded: tf.Tensor) -> tf.Tensor:
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def tfds_source(builder: Any, data_cfg: Any, *, name: str) -> Source:
  """A source over the 'image' feature of split `data_cfg.split` of a prepared tfds builder."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  split = data_cfg.split
  info = builder.info.splits[split]
  skip_decoding = {"image": tfds.decode.SkipDecoding()}

  if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
    records = builder.as_data_source(split, decoders=skip_decoding)

    def read(index: np.ndarray) -> bytes:
      return records[int(index)]["image"]

    def load(index: tf.Tensor) -> Decoded:
      encoded = tf.numpy_function(read, [index], tf.string, stateful=False)
      return _decode_tfds_image(tf.reshape(encoded, [])), _no_skips()

    return Source(name=name, num_examples=info.num_examples, load=load)

  instructions = info.file_instructions
  filenames = tf.constant([fi.filename for fi in instructions])
  skips = tf.constant([fi.skip for fi in instructions], tf.int64)
  takes = tf.constant([fi.take for fi in instructions], tf.int64)
  shuffle_buffer = int(data_cfg.shuffle_buffer)
  features = builder.info.features

  def stream(seed: int, start_position: int) -> tf.data.Dataset:
    start_epoch, offset = divmod(start_position, info.num_examples)

    @tf.autograph.experimental.do_not_convert
    def epoch_records(epoch: tf.Tensor) -> tf.data.Dataset:
      epoch_key = fold_seed(seed, ORDER_STREAM, epoch)
      order = tf.random.experimental.stateless_shuffle(tf.range(len(instructions)),
                                                       seed=epoch_key)
      shards = tf.data.Dataset.from_tensor_slices(
          (tf.gather(filenames, order), tf.gather(skips, order), tf.gather(takes, order)))
      records = shards.interleave(_read_shard, cycle_length=16, block_length=1,
                                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
      # Its own buffer seed per epoch: with few files a fixed one would repeat the order.
      buffer_seed = tf.random.stateless_uniform([], epoch_key, minval=0, maxval=2**31 - 1,
                                                dtype=tf.int64)
      return records.shuffle(shuffle_buffer, seed=buffer_seed, reshuffle_each_iteration=False)

    # `skip` reads but neither parses nor decodes the records before the start.
    return tf.data.Dataset.counter(start_epoch).flat_map(epoch_records).skip(offset)

  @tf.autograph.experimental.do_not_convert
  def decode(record: tf.Tensor) -> Decoded:
    encoded = features.deserialize_example(record, decoders=skip_decoding)["image"]
    return _decode_tfds_image(encoded), _no_skips()

  return Source(name=name, num_examples=info.num_examples, stream=stream, decode=decode)


def _prepared_builder(tfds_name: str, data_cfg: Any, help_text: str) -> Any:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  # An empty data_dir means tfds's default ($TFDS_DATA_DIR or ~/tensorflow_datasets).
  root = data_cfg.data_dir or tfds.core.constants.DATA_DIR
  builder = tfds.builder(tfds_name, data_dir=root)
  if not builder.is_prepared():
    manual = os.path.join(root, "downloads", "manual")
    raise FileNotFoundError(
        f"tfds dataset {tfds_name!r} is not prepared under data_dir {root!r} (expected "
        f"{builder.data_dir}); nothing is downloaded at run time.\n"
        + help_text.format(root=root, manual=manual))
  if data_cfg.split.split("[")[0] not in builder.info.splits:  # 'train[:10%]' slices too
    raise ValueError(f"tfds dataset {tfds_name!r} has no split {data_cfg.split!r}; set "
                     f"config.data.split to one of {sorted(builder.info.splits)}.")
  return builder


@register("imagenet2012")
def imagenet2012(data_cfg: Any) -> Source:
  """tfds imagenet2012 from a prepared `data_cfg.data_dir` (manual download needed)."""
  builder = _prepared_builder("imagenet2012", data_cfg, _IMAGENET_HELP)
  return tfds_source(builder, data_cfg, name="imagenet2012")


@register("coco2017")
def coco2017(data_cfg: Any) -> Source:
  """tfds coco/2017 images from a prepared `data_cfg.data_dir` (annotations unused)."""
  builder = _prepared_builder("coco/2017", data_cfg, _COCO_HELP)
  return tfds_source(builder, data_cfg, name="coco2017")
