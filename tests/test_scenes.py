"""Fashion-MNIST scenes: the real files, determinism, disjoint splits, honest label maps."""

import numpy as np
import pytest

from dense_ssl.data import scenes


def test_load_fashion_mnist_reads_the_real_files():
  images, labels = scenes.load_fashion_mnist("train")
  assert images.shape == (60_000, 28, 28) and images.dtype == np.uint8
  # Fashion-MNIST is balanced: 6000 training and 1000 test images per class.
  np.testing.assert_array_equal(np.bincount(labels), np.full(10, 6000))
  test_images, test_labels = scenes.load_fashion_mnist("test")
  assert test_images.shape == (10_000, 28, 28)
  np.testing.assert_array_equal(np.bincount(test_labels), np.full(10, 1000))
  # Real garments: dark background corners, bright content.
  assert images[:, 0, 0].mean() < 5 and images.max() == 255


def test_missing_files_name_the_package(tmp_path):
  with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
    scenes.load_fashion_mnist("train", directory=str(tmp_path))
  with pytest.raises(ValueError, match="probe_test"):
    scenes.make_scenes(1, 0, "validation")


def test_splits_are_disjoint_and_documented():
  train_images, _ = scenes.load_fashion_mnist("train")
  pretrain, _ = scenes.garments("pretrain")
  probe_train, _ = scenes.garments("probe_train")
  probe_test, _ = scenes.garments("probe_test")
  assert len(pretrain) == 50_000 and len(probe_train) == 10_000 and len(probe_test) == 10_000
  np.testing.assert_array_equal(probe_train[0], train_images[50_000])
  np.testing.assert_array_equal(pretrain[-1], train_images[49_999])
  np.testing.assert_array_equal(probe_test, scenes.load_fashion_mnist("test")[0])


def test_scenes_are_deterministic_prefix_stable_and_seeded():
  a = scenes.make_scenes(4, seed=3, split="probe_test", size=64)
  assert a["images"].shape == (4, 64, 64, 3) and a["images"].dtype == np.uint8
  assert a["label_maps"].shape == (4, 64, 64) and a["multi_hot"].shape == (4, 10)
  b = scenes.make_scenes(2, seed=3, split="probe_test", size=64, start=2)
  for key in a:
    np.testing.assert_array_equal(a[key][2:], b[key])
  c = scenes.make_scenes(2, seed=4, split="probe_test", size=64)
  assert not np.array_equal(a["images"][:2], c["images"])
  d = scenes.make_scenes(2, seed=3, split="probe_train", size=64)
  assert not np.array_equal(a["images"][:2], d["images"])


def test_a_background_pool_shares_backgrounds_between_scenes():
  # Without garments a scene is its background: a pool of 3 gives at most 3 different ones.
  def distinct(pool):
    empty = scenes.make_scenes(12, seed=0, split="pretrain", size=32, num_objects=(0, 0),
                               background_pool=pool)["images"]
    return len({image.tobytes() for image in empty})
  assert distinct(0) == 12 and 2 <= distinct(3) <= 3
  a = scenes.make_scenes(6, seed=1, split="pretrain", size=48, background_pool=4)
  b = scenes.make_scenes(3, seed=1, split="pretrain", size=48, background_pool=4, start=3)
  for key in a:
    np.testing.assert_array_equal(a[key][3:], b[key])
  assert a["num_boxes"].min() >= 2
  with pytest.raises(ValueError, match="background_pool"):
    scenes.make_scenes(1, 0, "pretrain", background_pool=-1)


def test_label_maps_and_multi_hot_agree_with_the_pixels():
  out = scenes.make_scenes(24, seed=0, split="pretrain", size=96)
  maps, hot = out["label_maps"], out["multi_hot"]
  assert maps.max() <= 10
  np.testing.assert_array_equal(hot, scenes.multi_hot(maps))
  # 2-5 garments per scene: between 1 (all the same class / occluded) and 5 visible classes.
  assert 1 <= hot.sum(1).min() and hot.sum(1).max() <= 5
  # Garments cover a minority of the canvas, background the rest.
  fg = (maps > 0).mean()
  assert 0.05 < fg < 0.5
  # Labelled pixels are the tinted garments: their colour differs from the background's
  # right next to them (mean absolute RGB difference across the label boundary).
  img = out["images"].astype(np.float32)
  inside = (maps[:, :, 1:] > 0) & (maps[:, :, :-1] == 0)
  jump = np.abs(img[:, :, 1:] - img[:, :, :-1]).sum(-1)[inside].mean()
  flat = np.abs(img[:, :, 1:] - img[:, :, :-1]).sum(-1)[(maps[:, :, 1:] == 0)
                                                        & (maps[:, :, :-1] == 0)].mean()
  assert jump > 2 * flat


def test_one_garment_scene_labels_one_garment_shape():
  out = scenes.make_scenes(8, seed=1, split="probe_train", size=96, num_objects=(1, 1),
                           scale=(0.5, 0.5))
  for label_map, hot in zip(out["label_maps"], out["multi_hot"]):
    assert hot.sum() == 1
    ys, xs = np.nonzero(label_map)
    # The labelled pixels fit in the 48x48 square the garment was pasted into.
    assert ys.max() - ys.min() < 48 and xs.max() - xs.min() < 48
    assert set(np.unique(label_map)) == {0, 1 + int(np.argmax(hot))}


def test_single_garments_keep_their_labels():
  images, labels = scenes.single_garments("probe_test", size=64, n=12)
  _, all_labels = scenes.garments("probe_test")
  assert images.shape == (12, 64, 64, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, all_labels[:12])
  again, _ = scenes.single_garments("probe_test", size=64, n=12)
  np.testing.assert_array_equal(images, again)
  # Each image is a distinct picture, not a constant canvas.
  assert images.reshape(12, -1).std(1).min() > 10
  assert len({im.tobytes() for im in images}) == 12


def test_grey_garments_are_the_tinted_scenes_without_colour():
  tinted = scenes.make_scenes(6, seed=2, split="probe_train", size=64)
  grey = scenes.make_scenes(6, seed=2, split="probe_train", size=64, tint=False)
  # The same draws: same garments, places and label maps; only the garments' colour differs.
  for key in ("label_maps", "boxes", "num_boxes", "multi_hot"):
    np.testing.assert_array_equal(tinted[key], grey[key])
  garment = grey["label_maps"] > 0
  # Fully covered garment pixels of the grey scenes have R = G = B (up to uint8 rounding of
  # the alpha blend at the edges); the tinted ones are coloured.
  inner = garment & np.roll(garment, 1, 1) & np.roll(garment, -1, 1)
  spread = lambda im: np.ptp(im.astype(np.int32), axis=-1)[inner]
  assert np.median(spread(grey["images"])) <= 1
  assert np.median(spread(tinted["images"])) > 20
  images, labels = scenes.single_garments("probe_test", size=64, n=8, tint=False)
  np.testing.assert_array_equal(labels, scenes.garments("probe_test")[1][:8])
  assert np.median(np.ptp(images.astype(np.int32), axis=-1)[:, 24:40, 24:40]) <= 1


def test_the_background_pool_is_one_for_every_split_and_seed():
  pool = scenes.shared_backgrounds(3, 48)
  as_uint8 = {scenes._to_uint8(b).tobytes() for b in pool}
  # Scenes without garments are their backgrounds: every split and seed draws from the pool.
  for split, seed in (("pretrain", 0), ("probe_train", 5), ("probe_test", 1)):
    empty = scenes.make_scenes(10, seed=seed, split=split, size=48, num_objects=(0, 0),
                               background_pool=3)["images"]
    assert {image.tobytes() for image in empty} <= as_uint8
  # The probes' single garments sit on one of them: their corners are a pool background's.
  images, _ = scenes.single_garments("probe_train", size=48, n=20, background_pool=3)
  corners = lambda im: np.concatenate([im[:2, :2], im[-2:, -2:]]).tobytes()
  pool_corners = {corners(scenes._to_uint8(b)) for b in pool}
  assert sum(corners(im) in pool_corners for im in images) >= 15  # big garments may cover one
  np.testing.assert_array_equal(scenes.shared_backgrounds(2, 48), pool[:2])
  with pytest.raises(ValueError, match="background_pool"):
    scenes.single_garments("probe_train", size=48, n=1, background_pool=-2)
