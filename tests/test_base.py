"""The method contract (methods/base.py): a method is one file, one config and one test.

This file defines a toy method of its own, one that no dense_ssl module knows: a single encoder
on three views of two sizes, two of them augmented by the toy's own colour preset, and trains it
two steps through `python -m dense_ssl.main` on 8 devices. Nothing in train.py names it: the
config points `method.module` at this file, which registers the method when imported.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from dense_ssl import losses
from dense_ssl.methods import base, families

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = "toy_three_views"


class ToyEncoder(nn.Module):
  """Backbone, global pooling, a linear projection."""

  backbone: nn.Module
  dim: int

  @nn.compact
  def __call__(self, x, train=True):
    pooled = jnp.mean(self.backbone(x, train), axis=(1, 2))
    return nn.Dense(self.dim, name="head")(pooled)


def _colourfulness(images):
  """Mean |R - G| + |G - B| of normalised images (0 for greyscale views)."""
  return jnp.mean(jnp.abs(images[..., 0] - images[..., 1]) + jnp.abs(images[..., 1] -
                                                                    images[..., 2]))


class ToyThreeViews(families.SingleEncoder):
  """InfoNCE between one 64 px view and two 32 px views of each image (SimCLR-like)."""

  def __init__(self, config, durations=None):
    super().__init__(config, durations)
    self.encoder = ToyEncoder(backbone=self.backbone.module, dim=int(config.method.dim))

  def views(self):
    small = dict(size=32, scale=(0.1, 0.5), preset="toy_grey")
    return (base.ViewSpec("big", 64, preset="mocov2"), base.ViewSpec("small1", **small),
            base.ViewSpec("small2", **small))

  def loss(self, params, state, batch, rng):
    del rng
    shapes = {k: batch[k].shape[1:] for k in ("big", "small1", "small2")}
    assert shapes == {"big": (64, 64, 3), "small1": (32, 32, 3), "small2": (32, 32, 3)}, shapes
    z, stats = self.online(params, state, batch["big"])
    z1, _ = self.online(params, state, batch["small1"])
    z2, _ = self.online(params, state, batch["small2"])
    loss = (losses.moco_v3_contrastive(z, z1, 0.2) + losses.moco_v3_contrastive(z, z2, 0.2)) / 2
    # Denormalisation does not matter for a grey test: R = G = B before and after it only
    # when the three channels share mean and std, so compare against the big view instead.
    metrics = {"loss": loss, "big_colour": _colourfulness(batch["big"]),
               "small_colour": _colourfulness(batch["small1"] * jnp.asarray(
                   self.config.augment.std) + jnp.asarray(self.config.augment.mean))}
    return loss, base.StepOutput(batch_stats={"online": stats}, extra={}, metrics=metrics)


# Imported both as this test module and, in the trainer's process, as `tests.test_base`: each
# process registers the toy once.
if TOY not in base.names():
  base.register(TOY)(ToyThreeViews)

CONFIG = textwrap.dedent(f"""
    import ml_collections
    from configs import common

    def get_config(arg=None):
      c = common.base_config()
      c.method = ml_collections.ConfigDict(dict(name="{TOY}", module="tests.test_base", dim=16,
                                                bn="sync", bn_groups=1))
      c.augment.presets.toy_grey = common.preset(grey_prob=1.0, jitter_prob=0.0, blur_prob=0.0)
      c.model.name = "resnet18"
      c.data.update(dict(source="demo", image_size=64, demo_num_images=64))
      c.batch_size = 16
      c.total_epochs, c.total_steps = 0.0, 2
      c.log_every_steps = c.checkpoint_every_steps = 1
      c.lock()
      return c
""")


def test_a_method_defined_in_a_test_file_trains_through_main(tmp_path):
  config = tmp_path / "toy.py"
  config.write_text(CONFIG)
  work = tmp_path / "run"
  env = {**os.environ, "PYTHONPATH": ROOT}
  out = subprocess.run([sys.executable, "-m", "dense_ssl.main", f"--config={config}",
                        f"--workdir={work}"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=1200)
  assert out.returncode == 0, out.stderr[-4000:]
  assert "over 8 devices" in out.stderr
  assert sorted(os.listdir(work / "checkpoints")) == ["1", "2"]
  assert json.loads((work / "config.json").read_text())["method"]["name"] == TOY
  # The trainer logged the toy's own metrics: the grey preset reached the small views only.
  logged = dict(re.findall(r"(train/\w+)=([-\d.e+naif]+)", out.stderr.split("] [2] ")[-1]))
  assert np.isfinite(float(logged["train/loss"]))
  assert float(logged["train/small_colour"]) < 1e-4 < float(logged["train/big_colour"])
  # And the run's backbone exports like any ResNet method's.
  assert "backbone_detectron2.pkl" in os.listdir(work / "export")


def test_views_are_checked_against_the_backbone_and_the_presets():
  toy = ToyThreeViews(_toy_config())
  toy.check_views()  # the toy's own views are fine (its preset is in the config)
  for views, message in (((base.ViewSpec("x", 64, preset="nope"),), "preset 'nope'.*defined: "),
                         ((base.ViewSpec("x", 48),), "not a multiple of the backbone's stride"),
                         ((base.ViewSpec("x", 64, grid=4),), "grid 4 must be size // stride")):
    toy.views = lambda views=views: views
    with pytest.raises(ValueError, match=message):
      toy.check_views()


def _toy_config(image_size=64):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top
  c = common.base_config()
  c.method = ml_collections.ConfigDict(dict(name=TOY, module="", dim=8, bn="sync", bn_groups=1))
  c.augment.presets.toy_grey = common.preset(grey_prob=1.0)
  c.model.name = "resnet18"
  c.data.image_size = image_size
  return c


def test_method_state_and_step_output_are_named():
  assert base.MethodState._fields == ("step", "target_params", "batch_stats", "extra")
  assert base.StepOutput._fields == ("batch_stats", "extra", "metrics")


def test_backbone_variables_reads_the_online_backbone():
  toy = ToyThreeViews(_toy_config())
  params = {"backbone": {"w": 1}, "head": {"w": 2}}
  stats = {"online": {"backbone": {"mean": 3}}}
  assert toy.backbone_variables(params, stats) == {"params": {"w": 1},
                                                   "batch_stats": {"mean": 3}}
  assert toy.backbone.family == "resnet" and toy.backbone.stride == 32
