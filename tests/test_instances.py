"""UniVIP's views (data/instances.py): crops whose overlap holds K proposals, instance crops,
their boxes in both views' coordinates, and the fallback; on Fashion-MNIST scenes with their
garments' boxes as proposals."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from dense_ssl import config_errors, methods
from dense_ssl.data import instances, pipeline, sources, spec, views

K = 2


@pytest.fixture(scope="module")
def setup():
  config = config_errors.load_config("configs/univip.py:test")
  method = methods.create(config)
  source = sources.create(config.data)
  return config, method.views(), source


def _to_original(box, view_box, flip):
  """A box in a view's normalised coordinates -> the original image's (correspondence_grid's
  geometry: undo the flip, then the crop)."""
  y0, x0, y1, x1 = box
  if flip:
    x0, x1 = 1.0 - x1, 1.0 - x0
  by0, bx0, by1, bx1 = view_box
  return np.array([by0 + y0 * (by1 - by0), bx0 + x0 * (bx1 - bx0),
                   by0 + y1 * (by1 - by0), bx0 + x1 * (bx1 - bx0)])


def _example(setup, index, seed, proposals=None):
  _, view_specs, source = setup
  image, _ = source.load(tf.constant(index, tf.int64))
  extras = source.extras(tf.constant(index, tf.int64))
  if proposals is not None:
    extras = {"proposals": tf.constant(proposals, tf.float32)}
  out = views.make_views(image, tf.constant([seed, 7], tf.int64), view_specs,
                         sampler=instances.SAMPLER, extras=extras)
  return image.numpy(), extras["proposals"].numpy(), {k: v.numpy() for k, v in out.items()}


def test_instance_boxes_lie_in_both_crops_and_map_to_one_region(setup):
  successes = 0
  for index in range(16):
    image, props, out = _example(setup, index, seed=index)
    height, width = image.shape[:2]
    originals = []
    for scene in ("view1", "view2"):
      boxes = out[spec.instance_boxes_key(scene)]
      assert boxes.shape == (K, 4)
      assert np.all(boxes >= -1e-6) and np.all(boxes <= 1 + 1e-6), (index, scene, boxes)
      assert np.all(boxes[:, 2:] > boxes[:, :2])
      originals.append(np.stack([_to_original(b, out[f"{scene}_box"], out[f"{scene}_flip"])
                                 for b in boxes]))
    np.testing.assert_allclose(originals[0], originals[1], atol=1e-5)
    for k in range(K):
      for scene in ("view1", "view2"):
        # The instance view is that region of the image, flipped with its scene view.
        np.testing.assert_allclose(out[f"{spec.instance_view(scene, k)}_box"], originals[0][k],
                                   atol=1e-5)
        assert out[f"{spec.instance_view(scene, k)}_flip"] == out[f"{scene}_flip"]
    if not out[spec.PROPOSAL_FALLBACK]:
      successes += 1
      # Each instance is one of the image's proposals (pixel rounding inwards only).
      for box in originals[0]:
        gap = np.max(np.abs(props - box) * [height, width, height, width], axis=1)
        assert gap.min() <= 1.0 + 1e-3, (index, box, props)
  assert successes >= 4  # most scenes hold two garments in some crop overlap


def test_instances_are_cropped_from_their_view(setup):
  """Instance k of view1 looks like view1's pixels inside its box (resized), more than like
  the other instance's region."""
  checked = 0
  for index in range(6):
    _, _, out = _example(setup, index, seed=100 + index)
    view = out["view1"].astype(np.float32)
    size = view.shape[0]
    regions = []
    for y0, x0, y1, x1 in out[spec.instance_boxes_key("view1")]:
      top, left = int(round(y0 * size)), int(round(x0 * size))
      bottom, right = max(int(round(y1 * size)), top + 1), max(int(round(x1 * size)), left + 1)
      patch = Image.fromarray(view[top:bottom, left:right].astype(np.uint8))
      regions.append(np.asarray(patch.resize((32, 32), Image.Resampling.BILINEAR), np.float32))
    crops = [out[spec.instance_view("view1", k)].astype(np.float32) for k in range(K)]
    own = [np.mean(np.abs(crops[k] - regions[k])) for k in range(K)]
    other = [np.mean(np.abs(crops[k] - regions[1 - k])) for k in range(K)]
    for a, b in zip(own, other):
      assert a < 25.0, own
      if b > 10.0:  # two distinct regions
        assert a < b, (own, other)
        checked += 1
  assert checked >= 2


def test_fallback_is_flagged_and_still_gives_boxes_inside_both_crops(setup):
  for seed in range(4):
    _, _, out = _example(setup, 0, seed=seed, proposals=np.zeros((0, 4), np.float32))
    assert out[spec.PROPOSAL_FALLBACK]
    for scene in ("view1", "view2"):
      boxes = out[spec.instance_boxes_key(scene)]
      assert np.all(boxes >= -1e-6) and np.all(boxes <= 1 + 1e-6)
  # Two boxes inside every crop of at least 20% of the scene's area at the centre: found.
  central = np.array([[0.45, 0.45, 0.5, 0.5], [0.5, 0.5, 0.55, 0.55]], np.float32)
  found = [not _example(setup, 0, seed=s, proposals=central)[2][spec.PROPOSAL_FALLBACK]
           for s in range(8)]
  assert sum(found) >= 6


def test_sampler_keys_describe_the_pipeline_batch(setup):
  config, view_specs, _ = setup
  batches = pipeline.create_iterator(config.data, views=view_specs, sampler=instances.SAMPLER,
                                     global_batch_size=8, seed=0, process_index=0,
                                     process_count=1)
  batch = next(batches)
  expected = spec.batch_shapes(view_specs, 8, views.sampler_keys(instances.SAMPLER, view_specs))
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
  assert batch["view1_inst0"].shape == (8, 32, 32, 3)


def test_bad_instance_view_names_are_rejected():
  scene = spec.ViewSpec("view1", 64)
  with pytest.raises(ValueError, match="two scene views"):
    instances.split_views([scene, spec.ViewSpec("view1_inst0", 32)])
