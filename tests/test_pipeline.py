"""Tests for dense_ssl.data.pipeline: batch layout, determinism, resume, process slices,
bad files in a folder, and both kinds of prepared tfds datasets."""

from __future__ import annotations

import io
import os

import ml_collections
import numpy as np
from PIL import Image
import pytest
import skimage.data
import tensorflow as tf
import tensorflow_datasets as tfds

from dense_ssl.data import pipeline
from dense_ssl.data import sources
from dense_ssl.data import spec

IMAGE_SIZE, GRID = 32, 2
VIEWS = tuple(spec.ViewSpec(name, IMAGE_SIZE, grid=GRID) for name in ("view1", "view2"))
KEYS = set(spec.batch_shapes(VIEWS, 1))


def data_config(**overrides) -> ml_collections.ConfigDict:
  cfg = dict(source="demo", data_dir="", folder="", split="train", image_size=IMAGE_SIZE,
             crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3), flip=True, shuffle_buffer=4,
             demo_num_images=12, prefetch=2)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def take(iterator, steps: int) -> list[dict[str, np.ndarray]]:
  return [next(iterator) for _ in range(steps)]


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def concat(parts: list[list[dict]]) -> list[dict]:
  """Per step, the process batches concatenated in process order."""
  return [{k: np.concatenate([p[step][k] for p in parts]) for k in parts[0][step]}
          for step in range(len(parts[0]))]


def check_layout(batch: dict[str, np.ndarray], rows: int) -> None:
  assert set(batch) == KEYS
  for v in ("view1", "view2"):
    assert batch[v].shape == (rows, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert batch[v].dtype == np.uint8
    assert batch[v + "_coords"].shape == (rows, GRID, GRID, 2)
    assert batch[v + "_coords"].dtype == np.float32
    assert batch[v + "_valid"].shape == (rows, GRID, GRID) and batch[v + "_valid"].all()
    assert batch[v + "_box"].shape == (rows, 4) and batch[v + "_box"].dtype == np.float32
    assert batch[v + "_flip"].shape == (rows,) and batch[v + "_flip"].dtype == bool
    # The grid is the cell centres of the box, mirrored where the view was flipped.
    box, flip = batch[v + "_box"], batch[v + "_flip"]
    centres = (np.arange(GRID) + 0.5) / GRID
    fx = np.where(flip[:, None], 1 - centres, centres)
    ys = box[:, 0, None] + centres * (box[:, 2] - box[:, 0])[:, None]
    xs = box[:, 1, None] + fx * (box[:, 3] - box[:, 1])[:, None]
    np.testing.assert_allclose(batch[v + "_coords"][..., 0], np.repeat(ys[:, :, None], GRID, 2),
                               atol=1e-6)
    np.testing.assert_allclose(batch[v + "_coords"][..., 1], np.repeat(xs[:, None, :], GRID, 1),
                               atol=1e-6)


# ------------------------------------------------------------------------------- demo ---


def demo_iterator(**kwargs) -> pipeline.Batches:
  # 12 images, batch 8: batches straddle epoch boundaries.
  return pipeline.create_iterator(data_config(), global_batch_size=8, views=VIEWS, **kwargs)


@pytest.fixture(scope="module")
def demo_run() -> tuple[pipeline.Batches, list[dict[str, np.ndarray]]]:
  """Five batches of an uninterrupted 1-process run, seed 3."""
  it = demo_iterator(seed=3, process_index=0, process_count=1)
  return it, take(it, 5)


def test_demo_batches_have_the_shared_layout_and_real_content(demo_run):
  it, batches = demo_run
  for batch in batches:
    check_layout(batch, 8)
  assert it.skipped_images == 0 and it.num_examples == 12
  batch = batches[0]
  # Views of photographs: neighbouring pixels agree (noise would give ~0).
  grey = batch["view1"].astype(np.float64).mean(-1)
  correlation = np.corrcoef(grey[:, :, :-1].ravel(), grey[:, :, 1:].ravel())[0, 1]
  assert correlation > 0.6
  assert batch["view1_flip"].any() and not batch["view1_flip"].all()
  assert len({b.tobytes() for b in batch["view1_box"]}) == 8


def test_resume_reproduces_the_uninterrupted_run(demo_run):
  _, fresh = demo_run
  resumed = take(demo_iterator(seed=3, start_step=3, process_index=0, process_count=1), 2)
  assert_batches_equal(resumed, fresh[3:5])
  # Steps differ from each other, and the seed matters.
  assert not np.array_equal(fresh[0]["view1_box"], fresh[1]["view1_box"])
  other = next(demo_iterator(seed=4, process_index=0, process_count=1))
  assert not np.array_equal(other["view1_box"], fresh[0]["view1_box"])


def test_process_slices_concatenate_to_the_global_batch(demo_run):
  _, fresh = demo_run
  halves = [take(demo_iterator(seed=3, start_step=1, process_index=p, process_count=2), 3)
            for p in (0, 1)]
  assert halves[0][0]["view1"].shape[0] == 4
  assert_batches_equal(concat(halves), fresh[1:4])


def test_each_epoch_is_its_own_permutation():
  n = 12
  positions = tf.range(3 * n, dtype=tf.int64)
  indices = np.array([pipeline.image_index(p, n, seed=0) for p in positions]).reshape(3, n)
  for epoch in indices:
    assert sorted(epoch) == list(range(n))
  assert not np.array_equal(indices[0], indices[1])
  assert not np.array_equal(indices[1], indices[2])


def test_views_of_several_sizes_come_as_the_method_declares_them():
  """Multi-crop: 2 views at 32 px with grids and a mask, 2 at 16 px; element_spec = spec."""
  views = (spec.ViewSpec("g1", 32, grid=2, mask=spec.MaskSpec(0.5)), spec.ViewSpec("g2", 32),
           spec.ViewSpec("l1", 16, scale=(0.05, 0.4)), spec.ViewSpec("l2", 16))
  it = pipeline.create_iterator(data_config(), global_batch_size=4, views=views, seed=3)
  batch = next(it)
  expected = spec.batch_shapes(views, 4)
  assert it.element_spec == expected
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
  assert (batch["g1_mask"].sum(axis=(1, 2)) == 2).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(global_batch_size=10, process_count=3, process_index=0), "multiple of"),
    (dict(global_batch_size=8, process_count=2, process_index=2), "process_index"),
])
def test_bad_arguments_are_refused(kwargs, message):
  with pytest.raises(ValueError, match=message):
    pipeline.create_iterator(data_config(), views=VIEWS, seed=0, **kwargs)


# ----------------------------------------------------------------------------- folder ---


def _png(array: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> bytes:
  image = Image.fromarray(array)
  buffer = io.BytesIO()
  (image.convert(mode) if mode else image).save(buffer, format=fmt)
  return buffer.getvalue()


@pytest.mark.parametrize("decoder", ["tf", "pil"])
def test_folder_with_bad_files_trains_on_and_counts_them(tmp_path, decoder):
  photo = skimage.data.astronaut()[::8, ::8]
  jpeg = _png(photo, fmt="JPEG")
  files = {
      "good.jpg": jpeg, "grey.png": _png(skimage.data.camera()[::8, ::8]),
      "cmyk.jpg": _png(photo, "CMYK", "JPEG"),
      "deep.png": _png(skimage.data.moon()[::8, ::8].astype(np.uint16) * 257),
      "tiny.png": _png(photo[:1, :1]),
      "x_corrupt.jpg": os.urandom(500), "x_truncated.jpg": jpeg[:len(jpeg) // 3],
      "empty.png": b"",
  }
  for name, data in files.items():
    (tmp_path / name).write_bytes(data)
  bad = {"x_corrupt.jpg", "x_truncated.jpg", "empty.png"}
  names = [os.path.basename(p) for p in sources.list_images(str(tmp_path))]

  steps, batch_size = 4, 4  # 16 positions: two epochs of 8 files
  it = pipeline.create_iterator(data_config(source="folder", folder=str(tmp_path),
                                            folder_decoder=decoder),
                                global_batch_size=batch_size, views=VIEWS, seed=1,
                                process_index=0, process_count=1)
  for batch in take(it, steps):
    check_layout(batch, batch_size)

  expected = 0
  for position in range(steps * batch_size):
    index = int(pipeline.image_index(tf.constant(position, tf.int64), len(names), seed=1))
    while names[index % len(names)] in bad:  # bad files are replaced by the next file
      expected += 1
      index += 1
  assert it.skipped_images == expected
  assert expected >= 2 * len(bad)  # every bad file is met once per epoch


def test_damaged_jpeg_that_looks_complete_names_the_decoder_setting(tmp_path):
  """TF's decoder cannot skip a file: the error says how to switch to PIL, which does."""
  jpeg = _png(skimage.data.astronaut()[::8, ::8], fmt="JPEG")
  (tmp_path / "a_good.jpg").write_bytes(jpeg)
  # Intact start and end markers around a destroyed header: passes the completeness check.
  (tmp_path / "b_damaged.jpg").write_bytes(jpeg[:3] + b"\x00" * 200 + jpeg[-2:])

  def first_batches(decoder):
    it = pipeline.create_iterator(
        data_config(source="folder", folder=str(tmp_path), folder_decoder=decoder),
        global_batch_size=2, views=VIEWS, seed=0, process_index=0, process_count=1)
    return take(it, 2), it.skipped_images

  with pytest.raises(ValueError, match="config.data.folder_decoder=pil"):
    first_batches("tf")
  batches, skipped = first_batches("pil")
  assert skipped == 2  # the damaged file was met twice in two epochs and replaced both times
  check_layout(batches[0], 2)


# ------------------------------------------------------------------------------- tfds ---


def tiny_photos() -> list[np.ndarray]:
  """Ten crops of different sizes of a real photo."""
  photo = skimage.data.chelsea()
  return [photo[10 * k:10 * k + 40 + k, 20 * k:20 * k + 50] for k in range(10)]


class TinyPhotos(tfds.core.GeneratorBasedBuilder):
  """Ten crops of a real photo in a locally prepared tfds dataset (no downloads)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {"image": tfds.features.Image(), "label": tfds.features.ClassLabel(num_classes=10)}))

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for k, image in enumerate(tiny_photos()):
      yield k, {"image": image, "label": k}


@pytest.fixture(scope="module", params=["array_record", "tfrecord"])
def tiny_tfds(request, tmp_path_factory):
  """A prepared TinyPhotos builder, in one file format."""
  root = tmp_path_factory.mktemp(request.param)
  TinyPhotos(data_dir=str(root), file_format=request.param).download_and_prepare()
  return tfds.builder_from_directory(str(root / "tiny_photos" / "1.0.0"))


def _tfds_batches(source, steps, *, start_step=0, process_index=0, process_count=1):
  ds = pipeline.build_dataset(source, data_config(), global_batch_size=4, views=VIEWS, seed=5,
                              start_step=start_step, process_index=process_index,
                              process_count=process_count)
  return take(pipeline.Batches(ds, num_examples=source.num_examples), steps)


def test_tfds_batches_resume_and_process_slices(tiny_tfds):
  source = sources.tfds_source(tiny_tfds, data_config(), name="tiny_photos")
  random_access = tiny_tfds.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
  assert source.random_access == random_access and source.num_examples == 10
  fresh = _tfds_batches(source, 5)  # 20 positions: two epochs of 10 images
  for batch in fresh:
    check_layout(batch, 4)
  if random_access:
    return  # the same index arithmetic as the demo source, whose resume is tested above
  # The ordered stream has its own resume (skip) and process (filter) logic.
  assert_batches_equal(_tfds_batches(source, 2, start_step=3), fresh[3:])
  halves = [_tfds_batches(source, 3, start_step=2, process_index=p, process_count=2)
            for p in (0, 1)]
  assert_batches_equal(concat(halves), fresh[2:5])


def test_tfds_stream_reads_every_image_once_per_epoch(tiny_tfds):
  source = sources.tfds_source(tiny_tfds, data_config(shuffle_buffer=4), name="tiny_photos")
  expected = sorted(image.tobytes() for image in tiny_photos())  # PNG: lossless
  if source.random_access:
    read = lambda position: source.load(pipeline.image_index(
        tf.constant(position, tf.int64), 10, seed=2))[0].numpy()
    epochs = [[read(p) for p in range(e * 10, e * 10 + 10)] for e in range(2)]
  else:
    records = list(source.stream(2, 0).take(20).as_numpy_iterator())
    epochs = [[source.decode(r)[0].numpy() for r in records[e * 10:e * 10 + 10]]
              for e in range(2)]
    # Starting later is the same stream, minus its head.
    later = list(source.stream(2, 13).take(3).as_numpy_iterator())
    assert later == records[13:16]
  for epoch in epochs:
    assert sorted(image.tobytes() for image in epoch) == expected
  assert [e.tobytes() for e in epochs[0]] != [e.tobytes() for e in epochs[1]]
