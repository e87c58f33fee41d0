"""Full fine-tuning with layer-wise lr decay (dense_ssl/evaluate/finetune.py) on ViT-micro/8."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dense_ssl import evaluate, models
from dense_ssl.evaluate import features, finetune


def _backbone(**options):
  return models.Backbone("vit_micro8", models.get_backbone("vit_micro8", **options))


def test_layer_ids_and_decay_factors_on_a_real_vit():
  backbone = _backbone(rel_pos_bias=True, pos_embed="none", layer_scale=0.1,
                       use_mask_token=True)
  params = {"backbone": features.init_variables(backbone, image_size=32)["params"],
            "head": {"kernel": np.zeros((64, 10)), "bias": np.zeros(10)}}
  scales = finetune.layer_scales(params, depth=2, decay=0.5)
  b = scales["backbone"]
  for name in ("patch_embed", "cls_token", "mask_token"):
    assert set(jax.tree.leaves(b[name])) == {0.125}, name  # layer 0: 0.5 ** 3
  assert set(jax.tree.leaves(b["block0"])) == {0.25}
  assert set(jax.tree.leaves(b["block1"])) == {0.5}
  assert set(jax.tree.leaves(b["norm"])) | set(jax.tree.leaves(scales["head"])) == {1.0}
  assert b["block0"]["rel_pos"]["table"] == 0.25

  # The optimiser's first step is lr · factor per layer (Adam's first step is g / |g|), and
  # decays only matrices outside the tokens and the bias tables.
  tx = finetune.optimizer(params, lambda step: 1e-2, depth=2, layer_decay=0.5, weight_decay=0.0)
  grads = jax.tree.map(lambda p: jnp.ones(np.shape(p)), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  for u, s in zip(jax.tree.leaves(updates), jax.tree.leaves(scales)):
    np.testing.assert_allclose(u, -1e-2 * s, rtol=1e-5)
  with_decay = finetune.optimizer(params, lambda step: 1.0, depth=2, layer_decay=0.5,
                                  weight_decay=1.0)
  zero = jax.tree.map(lambda p: jnp.zeros(np.shape(p)), params)
  moved, _ = with_decay.update(zero, with_decay.init(params), params)
  assert np.any(moved["backbone"]["block0"]["mlp_fc1"]["kernel"] != 0)
  for leaf in (moved["backbone"]["block0"]["mlp_fc1"]["bias"], moved["backbone"]["cls_token"],
               moved["backbone"]["block0"]["rel_pos"]["table"], moved["backbone"]["block0"]["ls1"]):
    np.testing.assert_array_equal(leaf, 0.0)


def test_finetune_runs_on_the_garments_and_is_registered():
  backbone = _backbone(layer_scale=0.1, drop_path=0.1)
  variables = features.init_variables(backbone, image_size=32)
  ev = evaluate.create("finetune", backbone, num_train=64, num_test=32, image_size=32, steps=6,
                       batch_size=16, warmup_steps=2)
  out = dict(ev.run(variables))
  assert set(out) == {"top1", "train_loss"}
  assert 0.0 <= out["top1"] <= 1.0 and np.isfinite(out["train_loss"])
  with pytest.raises(ValueError, match="use the linear probe"):
    evaluate.create("finetune", models.build(type("M", (), {"name": "resnet18"})()))
