"""Tests for dense_ssl.data.sources: registry, demo photos, image folders, tfds errors, synthetic."""

from __future__ import annotations

import io
import os

import ml_collections
import numpy as np
from PIL import Image
import pytest
import skimage.data
import tensorflow as tf

from dense_ssl.data import sources


def data_config(**overrides) -> ml_collections.ConfigDict:
  cfg = dict(source="demo", data_dir="", folder="", split="train", image_size=32,
             crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3), flip=True, shuffle_buffer=100,
             demo_num_images=16, prefetch=2)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def neighbour_correlation(image: np.ndarray) -> float:
  """Correlation of horizontally adjacent pixels: ~1 for photographs, ~0 for noise."""
  grey = image.astype(np.float64).mean(-1)
  return float(np.corrcoef(grey[:, :-1].ravel(), grey[:, 1:].ravel())[0, 1])


def load(source: sources.Source, index: int) -> tuple[np.ndarray, int]:
  image, skipped = source.load(tf.constant(index, tf.int64))
  return image.numpy(), int(skipped)


def test_unknown_source_lists_the_valid_names():
  with pytest.raises(ValueError, match=r"Unknown data source 'imagenet' \(config.data.source\); "
                     r"valid choices: coco2017, demo, fmnist_scenes, folder, imagenet2012, "
                     r"synthetic\."):
    sources.create(data_config(source="imagenet"))


# ------------------------------------------------------------------------------- demo ---


def test_demo_photos_are_real_rgb_photographs():
  photos = sources.demo_photos()
  assert len(photos) == 15
  for photo in photos:
    assert photo.dtype == np.uint8 and photo.ndim == 3 and photo.shape[2] == 3
    assert max(photo.shape[:2]) <= 512 and min(photo.shape[:2]) >= 100
    assert neighbour_correlation(photo) > 0.5
  # The grey photos (brick, grass, camera ...) were replicated to RGB.
  assert sum(np.array_equal(p[..., 0], p[..., 2]) for p in photos) == 6


def test_demo_source_cuts_deterministic_crops_of_the_photos():
  photos = sources.demo_photos()
  table = sources.demo_crop_table([p.shape[:2] for p in photos], 40)
  np.testing.assert_array_equal(table, sources.demo_crop_table([p.shape[:2] for p in photos],
                                                               40))
  assert len(set(table[:, 0])) > 10  # crops from most photos
  source = sources.create(data_config(source="demo", demo_num_images=40))
  assert source.num_examples == 40 and source.random_access
  sizes = set()
  for k in (0, 7, 39):
    image, skipped = load(source, k)
    photo, y0, x0, h, w = table[k]
    np.testing.assert_array_equal(image, photos[photo][y0:y0 + h, x0:x0 + w])
    assert skipped == 0 and min(h, w) >= 48
    sizes.add((h, w))
  assert len(sizes) == 3


def test_demo_needs_at_least_one_image():
  with pytest.raises(ValueError, match="demo_num_images must be >= 1"):
    sources.create(data_config(source="demo", demo_num_images=0))


# ----------------------------------------------------------------------------- folder ---


def _encode(array: np.ndarray, fmt: str, mode: str | None = None, **kwargs) -> bytes:
  image = Image.fromarray(array)
  if mode:
    image = image.convert(mode)
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> tuple[str, dict[str, np.ndarray], set[str]]:
  """A folder of good images in many formats plus undecodable files.

  Returns the folder, the expected decoded RGB of each good file (by relative path) and the
  relative paths of the bad files.
  """
  root = tmp_path_factory.mktemp("images")
  photo = skimage.data.coffee()[100:148, 200:264]  # 48 x 64 real photo
  grey = skimage.data.camera()[200:240, 200:240]
  deep = (skimage.data.moon()[:40, :40].astype(np.uint16) * 257 + 100)  # 16-bit grey
  files = {
      "a/photo.png": (_encode(photo, "PNG"), photo),
      "a/photo.jpg": (_encode(photo, "JPEG", quality=95), photo),
      "a/b/grey.png": (_encode(grey, "PNG"), np.repeat(grey[..., None], 3, -1)),
      "a/b/cmyk.jpg": (_encode(photo, "JPEG", mode="CMYK", quality=95), photo),
      "deep16.png": (_encode(deep, "PNG"), np.repeat(
          np.round(deep / 257.0).astype(np.uint8)[..., None], 3, -1)),
      "tiny.png": (_encode(photo[:1, :1], "PNG"), photo[:1, :1]),
      "alpha.png": (_encode(np.dstack([photo, np.full(photo.shape[:2], 7, np.uint8)]), "PNG"),
                    photo),
      "photo.webp": (_encode(photo, "WEBP", lossless=True), photo),
      "photo.bmp": (_encode(photo, "BMP"), photo),
      "photo.GIF": (_encode(grey, "GIF"), np.repeat(grey[..., None], 3, -1)),
  }
  good_jpeg = files["a/photo.jpg"][0]
  bad = {
      "a/corrupt.jpg": os.urandom(2000),
      "a/truncated.jpg": good_jpeg[:len(good_jpeg) // 2],
      "empty.png": b"",
      "b_not_png.png": b"This is a text file, not a PNG.",
  }
  for rel, data in [(r, d) for r, (d, _) in files.items()] + list(bad.items()):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
  (root / "notes.txt").write_text("not an image: ignored by extension")
  return str(root), {r: a for r, (_, a) in files.items()}, set(bad)


def test_folder_lists_images_recursively_and_in_order(image_folder):
  root, good, bad = image_folder
  paths = sources.list_images(root)
  assert [os.path.relpath(p, root) for p in paths] == sorted(good.keys() | bad)


@pytest.mark.parametrize("decoder", sources.FOLDER_DECODERS)
def test_folder_decodes_every_kind_of_good_image(image_folder, decoder):
  root, good, _ = image_folder
  source = sources.create(data_config(source="folder", folder=root, folder_decoder=decoder))
  paths = [os.path.relpath(p, root) for p in sources.list_images(root)]
  assert source.num_examples == len(paths)
  for index, rel in enumerate(paths):
    if rel not in good:
      continue
    image, skipped = load(source, index)
    expected = good[rel]
    assert skipped == 0 and image.dtype == np.uint8 and image.shape == expected.shape, rel
    lossy = rel.endswith((".jpg", ".GIF"))
    error = np.abs(image.astype(int) - expected.astype(int)).mean()
    assert error < (4 if lossy else 1e-9), (rel, error)


@pytest.mark.parametrize("decoder", sources.FOLDER_DECODERS)
def test_folder_replaces_bad_files_by_the_next_good_one_and_counts_them(image_folder, decoder):
  root, good, bad = image_folder
  source = sources.create(data_config(source="folder", folder=root, folder_decoder=decoder))
  paths = [os.path.relpath(p, root) for p in sources.list_images(root)]
  total_skipped = 0
  for index, rel in enumerate(paths):
    if rel not in bad:
      continue
    image, skipped = load(source, index)
    # Consecutive bad files are all skipped; the image is the first good file after them.
    following = [(k % len(paths)) for k in range(index, index + len(paths))]
    first_good = next(k for k in following if paths[k] in good)
    assert skipped == (first_good - index) % len(paths)
    np.testing.assert_array_equal(image, load(source, first_good)[0])
    total_skipped += skipped
  assert total_skipped >= len(bad)


@pytest.mark.parametrize("decoder", sources.FOLDER_DECODERS)
def test_folder_decoding_inside_tf_data(image_folder, decoder):
  root, _, bad = image_folder
  source = sources.create(data_config(source="folder", folder=root, folder_decoder=decoder))
  ds = tf.data.Dataset.range(source.num_examples).map(source.load, num_parallel_calls=4,
                                                      deterministic=True)
  results = list(ds.as_numpy_iterator())
  assert len(results) == source.num_examples
  for index, (image, skipped) in enumerate(results):
    eager_image, eager_skipped = load(source, index)
    np.testing.assert_array_equal(image, eager_image)
    assert skipped == eager_skipped
  assert sum(int(s) for _, s in results) >= len(bad)


def test_folder_jpegs_decode_alike_with_tensorflow_and_pil(image_folder):
  """The fast path (tf.io.decode_jpeg) gives PIL's pixels exactly, CMYK included."""
  root, good, _ = image_folder
  fast = sources.create(data_config(source="folder", folder=root, folder_decoder="tf"))
  slow = sources.create(data_config(source="folder", folder=root, folder_decoder="pil"))
  paths = [os.path.relpath(p, root) for p in sources.list_images(root)]
  jpegs = [i for i, rel in enumerate(paths) if rel in good and rel.endswith(".jpg")]
  assert len(jpegs) == 2
  for index in jpegs:
    (a, skipped_a), (b, skipped_b) = load(fast, index), load(slow, index)
    assert a.shape == b.shape and skipped_a == skipped_b == 0
    np.testing.assert_array_equal(a, b, err_msg=paths[index])


def test_folder_rejects_an_unknown_decoder(image_folder):
  with pytest.raises(ValueError, match="config.data.folder_decoder='opencv'.*tf, pil"):
    sources.create(data_config(source="folder", folder=image_folder[0], folder_decoder="opencv"))


@pytest.mark.parametrize("setup, message", [
    (lambda root: None, "does not exist"),
    (lambda root: root.mkdir(), "holds no image files"),
    (lambda root: (root.mkdir(), (root / "x.jpg").write_bytes(b"junk")), "No decodable image"),
])
def test_folder_errors_name_the_path(tmp_path, setup, message):
  root = tmp_path / "photos"
  setup(root)
  with pytest.raises((FileNotFoundError, ValueError), match=message) as error:
    sources.create(data_config(source="folder", folder=str(root)))
  assert str(root) in str(error.value)


# ------------------------------------------------------------------------------- tfds ---


def test_unprepared_imagenet_explains_the_manual_download(tmp_path):
  with pytest.raises(FileNotFoundError) as error:
    sources.create(data_config(source="imagenet2012", data_dir=str(tmp_path)))
  text = str(error.value)
  assert str(tmp_path) in text
  assert os.path.join(str(tmp_path), "downloads", "manual") in text
  assert "ILSVRC2012_img_train.tar" in text and "download_and_prepare" in text
  assert not any(tmp_path.iterdir())  # nothing was downloaded or created


def test_unprepared_coco_says_it_cannot_be_prepared_offline(tmp_path):
  with pytest.raises(FileNotFoundError) as error:
    sources.create(data_config(source="coco2017", data_dir=str(tmp_path)))
  text = str(error.value)
  assert str(tmp_path) in text and "offline" in text and "coco/2017" in text


# -------------------------------------------------------------------------- synthetic ---


def test_synthetic_images_are_random_and_of_the_image_size():
  source = sources.create(data_config(source="synthetic", image_size=24))
  first, skipped = load(source, 0)
  assert first.shape == (24, 24, 3) and first.dtype == np.uint8 and skipped == 0
  assert abs(neighbour_correlation(first)) < 0.2
  assert not np.array_equal(first, load(source, 1)[0])
  assert source.num_examples == 1_281_167
