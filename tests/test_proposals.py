"""Object proposals (data/proposals.py): ORL's filter, the garments option, the sidecar and the
selective-search command (skipped where OpenCV contrib is not installed)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

from dense_ssl import config_errors
from dense_ssl.data import proposals, scenes, sources


def test_filter_keeps_orl_boxes_in_order():
  boxes = np.array([
      [0, 0, 100, 100],     # kept
      [0, 0, 100, 95],      # IoU 0.95 with the first: dropped
      [0, 0, 30, 100],      # w/h = 3.33: dropped
      [200, 200, 250, 240],  # a side of 40 < 64: dropped
      [50, 50, 150, 150],   # IoU 1/7 with the first: kept
      [0, 120, 200, 190],   # h 200, w 70, w/h 0.35: kept
  ], np.float32)
  kept = proposals.filter_boxes(boxes, min_side=64)
  np.testing.assert_array_equal(kept, boxes[[0, 4, 5]])
  assert len(proposals.filter_boxes(boxes, 64, max_boxes=2)) == 2
  assert proposals.filter_boxes(np.zeros((0, 4)), 64).shape == (0, 4)


def test_garment_boxes_cover_every_garment_pixel():
  made = scenes.make_scenes(12, 0, "pretrain", 96)
  for label_map, boxes, n in zip(made["label_maps"], made["boxes"], made["num_boxes"]):
    covered = np.zeros_like(label_map, bool)
    for y0, x0, y1, x1 in boxes[:n]:
      assert 0 <= y0 < y1 <= 96 and 0 <= x0 < x1 <= 96
      covered[y0:y1, x0:x1] = True
    assert np.all(covered[label_map > 0])
    assert 2 <= n <= 5


@pytest.mark.parametrize("pool", [0, 3])
def test_garments_as_proposals_through_the_source(pool):
  config = config_errors.load_config("configs/univip.py:test")
  config = config_errors.override(config, {"data.scenes_background_pool": pool})
  source = sources.create(config.data)
  made = scenes.make_scenes(4, sources.SCENES_DATA_SEED, "pretrain", 96, background_pool=pool)
  np.testing.assert_array_equal(np.stack(proposals.read_images(config.data, 0, 4)),
                                made["images"])
  for i in range(4):
    np.testing.assert_array_equal(source.load(tf.constant(i, tf.int64))[0].numpy(),
                                  made["images"][i])
    got = source.extras(tf.constant(i, tf.int64))["proposals"].numpy()
    want = proposals.normalise(proposals.filter_boxes(made["boxes"][i][:made["num_boxes"][i]],
                                                      12.0), 96, 96)
    np.testing.assert_allclose(got, want)


def test_missing_sidecar_names_the_command(tmp_path):
  config = config_errors.load_config("configs/univip.py:demo")
  config = config_errors.override(config, {"data.proposals_path": str(tmp_path / "none.npz")})
  with pytest.raises(FileNotFoundError, match="python -m dense_ssl.data.proposals"):
    sources.create(config.data)


def test_unknown_kind_and_streaming_sources_are_rejected():
  config = config_errors.load_config("configs/univip.py:test")
  bad = config_errors.override(config, {"data.proposals": "edges"})
  with pytest.raises(ValueError, match="config.data.proposals"):
    sources.create(bad.data)


def test_selective_search_command_is_resumable(tmp_path):
  pytest.importorskip("cv2")
  config = config_errors.load_config("configs/univip.py:demo")
  config = config_errors.override(config, {"data.demo_num_images": 6,
                                           "data.proposals_path": str(tmp_path / "p.npz")})
  first = proposals.compute(config.data, workers=1, chunk=2, progress=False)
  assert first["images"] == 6 and first["chunks_done_before"] == 0
  boxes, offsets = proposals.read_sidecar(config.data, 6)
  assert offsets.shape == (7,) and len(boxes) == offsets[-1] > 0
  images = proposals.read_images(config.data, 0, 6)
  for i, image in enumerate(images):
    b = boxes[offsets[i]:offsets[i + 1]] * np.array([*image.shape[:2]] * 2, np.float32)
    h, w = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    assert np.all(h >= 32 - 1e-3) and np.all(w >= 32 - 1e-3)
    assert np.all((w / h >= 1 / 3 - 1e-6) & (w / h <= 3 + 1e-6))
    if len(b) > 1:
      overlaps = proposals.iou(b, b)[~np.eye(len(b), dtype=bool)]
      assert np.all(overlaps <= 0.5 + 1e-6)
  # Resume: one part lost, one recomputed; the merged file is the same.
  parts = sorted(os.listdir(str(tmp_path / "p.npz.parts")))
  os.remove(str(tmp_path / "p.npz.parts" / parts[1]))
  again = proposals.compute(config.data, workers=1, chunk=2, progress=False)
  assert again["chunks_done_before"] == 2
  boxes2, offsets2 = proposals.read_sidecar(config.data, 6)
  np.testing.assert_array_equal(boxes, boxes2)
  np.testing.assert_array_equal(offsets, offsets2)
