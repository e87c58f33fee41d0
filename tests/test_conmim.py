"""ConMIM's loss (methods/conmim.py): the intra-image patch InfoNCE."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dense_ssl.methods import conmim


def test_patch_info_nce_pools_over_masked_positions_only():
  rng = np.random.default_rng(5)
  s, t = (jnp.asarray(rng.normal(size=(2, 6, 4)), jnp.float32) for _ in range(2))
  mask = jnp.asarray([[1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0]], bool)
  loss, aux = conmim.patch_info_nce(s, t, mask, 0.1)
  ce = np.asarray(aux["ce"])
  pooled = ce[np.asarray(mask)].mean()
  per_image = np.mean([ce[n][np.asarray(mask[n])].mean() for n in range(2)])
  np.testing.assert_allclose(loss, pooled, rtol=1e-6)
  assert abs(pooled - per_image) > 1e-4  # the two reductions differ for unequal counts
  # The student's unmasked tokens do not enter the loss; the teacher's (negatives) do.
  g_s = jax.grad(lambda x: conmim.patch_info_nce(x, t, mask, 0.1)[0])(s)
  np.testing.assert_array_equal(np.asarray(g_s)[~np.asarray(mask)], 0.0)
  g_t = jax.grad(lambda x: conmim.patch_info_nce(s, x, mask, 0.1)[0])(t)
  assert np.all(np.abs(np.asarray(g_t)[~np.asarray(mask)]).sum(-1) > 0)


# ---------------------------------------------------------------------------------------------
# Masks, the ViT's BEiT options, the method's gradients, and training.
# ---------------------------------------------------------------------------------------------

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
from jax.sharding import AxisType, Mesh  # noqa: E402

from dense_ssl import checkpoint, config_errors, sharding, train  # noqa: E402
from dense_ssl import methods as methods_lib  # noqa: E402
from dense_ssl.data import pipeline, scenes  # noqa: E402
from dense_ssl.models import vit  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(variant="test", **overrides):
  return config_errors.override(config_errors.load_config(f"configs/conmim.py:{variant}"),
                                overrides)


def test_random_mask_has_the_ratio_in_aligned_blocks():
  masks = np.asarray(conmim.random_mask(jax.random.key(0), 64, 14, 0.75, 2))
  assert masks.shape == (64, 196) and masks.dtype == bool
  np.testing.assert_array_equal(masks.sum(1), 4 * 37)  # ceil(0.75 · 49) squares of 2 x 2
  grids = masks.reshape(64, 7, 2, 7, 2)
  assert np.all(grids.min(axis=(2, 4)) == grids.max(axis=(2, 4)))  # whole squares only
  many = np.asarray(conmim.random_mask(jax.random.key(2), 1024, 14, 0.75, 2)).mean(0)
  assert 0.68 < many.min() and many.max() < 0.82  # uniform over positions
  again = np.asarray(conmim.random_mask(jax.random.key(0), 64, 14, 0.75, 2))
  np.testing.assert_array_equal(masks, again)  # a function of the key
  assert not np.array_equal(masks, conmim.random_mask(jax.random.key(1), 64, 14, 0.75, 2))


def _components(mask):
  """Sizes of the 4-connected masked regions of a 2-D bool mask."""
  seen, sizes = np.zeros_like(mask), []
  for start in zip(*np.nonzero(mask)):
    if seen[start]:
      continue
    stack, size = [start], 0
    seen[start] = True
    while stack:
      r, c = stack.pop()
      size += 1
      for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
        if 0 <= rr < mask.shape[0] and 0 <= cc < mask.shape[1] and mask[rr, cc] and not seen[rr, cc]:
          seen[rr, cc] = True
          stack.append((rr, cc))
    sizes.append(size)
  return sizes


def test_blockwise_mask_is_beits_rectangles_up_to_the_ratio():
  masks = np.asarray(conmim.blockwise_mask(jax.random.key(3), 32, 14, 0.75))
  target = 147  # ceil(0.75 · 196)
  counts = masks.sum(1)
  assert counts.max() <= target and np.mean(counts) > 0.9 * target
  assert np.mean(counts == target) > 0.5  # most images reach it, as BEiT's generator
  # Rectangles of >= 16 patches (the first covers at least min_patches): big connected blobs,
  # unlike the random squares.
  for m in masks[:8].reshape(8, 14, 14):
    assert max(_components(m)) >= 16
  np.testing.assert_array_equal(masks, conmim.blockwise_mask(jax.random.key(3), 32, 14, 0.75))


def test_relative_position_bias_shapes_zero_init_and_other_grids():
  model = vit.get("vit_micro8", rel_pos_bias=True, pos_embed="none", layer_scale=0.1,
                  use_mask_token=True)
  images = np.asarray(scenes.single_garments("probe_train", n=2, size=32, seed=0)[0],
                      np.float32) / 255.0
  variables = model.init(jax.random.key(0), images, train=False)
  table = variables["params"]["block0"]["rel_pos"]["table"]
  assert table.shape == ((2 * 4 - 1)**2 + 3, 2)  # a 4x4 grid, 2 heads
  np.testing.assert_array_equal(table, 0.0)
  plain = vit.get("vit_micro8", pos_embed="none", layer_scale=0.1, use_mask_token=True)
  without = {k: ({n: w for n, w in v.items() if n != "rel_pos"} if k.startswith("block") else v)
             for k, v in variables["params"].items()}
  np.testing.assert_array_equal(model.apply(variables, images, train=False),
                                plain.apply({"params": without}, images, train=False))
  # BEiT's index: the three cls entries last; offsets (dy, dx) at (dy+3)·7 + dx+3.
  index = vit.relative_position_index(4)
  assert index.shape == (17, 17) and index[0, 0] == 51 and index[0, 1] == 49
  assert index[1, 0] == 50 and index[1, 1] == 3 * 7 + 3 and index[1, 16] == 0
  # A smaller grid reads the same table at the same offsets: no interpolation.
  small = vit.relative_position_index_in(2, 4)
  assert small[1, 4] == (0 - 1 + 3) * 7 + (0 - 1 + 3)  # patch (0,0) to patch (1,1)
  bias = vit.RelativePositionBias(2).apply(
      {"params": {"table": jnp.arange(104.0).reshape(52, 2)}}, (2, 2))
  np.testing.assert_array_equal(bias[1], np.arange(104.0).reshape(52, 2)[small, 1])
  out = model.apply(variables, images[:, :16, :16], train=False)
  assert out.shape == (2, 5, 64)
  # A larger grid reads the table resized: 7x7 offsets -> 15x15, the zero offset and the three
  # class-token entries unchanged, a constant table constant.
  table = np.arange(104.0).reshape(52, 2)
  big = vit.RelativePositionBias(2).apply({"params": {"table": jnp.asarray(table)}}, (8, 8))
  assert big.shape == (2, 65, 65)
  np.testing.assert_allclose(np.diagonal(big[:, 1:, 1:], axis1=1, axis2=2),
                             np.broadcast_to(table[3 * 7 + 3][:, None], (2, 64)), rtol=1e-6)
  np.testing.assert_array_equal(big[:, 0, 0], table[51])
  np.testing.assert_array_equal(big[:, 0, 1:], np.broadcast_to(table[49][:, None], (2, 64)))
  flat = vit.RelativePositionBias(2).apply({"params": {"table": jnp.ones((52, 2))}}, (8, 8))
  np.testing.assert_allclose(flat, 1.0, rtol=1e-6)
  assert model.apply(variables, np.zeros((1, 64, 64, 3), np.float32),
                     train=False).shape == (1, 65, 64)
  # Shared: one table at the top for all blocks, none in the blocks; the same zero-init identity.
  shared = vit.get("vit_micro8", rel_pos_bias=True, shared_rel_pos_bias=True, pos_embed="none",
                   layer_scale=0.1, use_mask_token=True)
  shared_vars = shared.init(jax.random.key(0), images, train=False)
  assert shared_vars["params"]["rel_pos"]["table"].shape == table.shape
  assert not any("rel_pos" in v for k, v in shared_vars["params"].items() if k.startswith("block"))
  without_shared = {k: v for k, v in shared_vars["params"].items() if k != "rel_pos"}
  np.testing.assert_array_equal(shared.apply(shared_vars, images, train=False),
                                plain.apply({"params": without_shared}, images, train=False))
  with pytest.raises(ValueError, match="rel_pos_bias=True"):
    vit.get("vit_micro8", shared_rel_pos_bias=True).init(jax.random.key(0), images, train=False)


def test_drop_path_is_random_in_training_and_off_in_eval():
  model = vit.get("vit_micro8", layer_scale=1.0, drop_path=0.5)
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
  variables = model.init(jax.random.key(1), x, train=False)
  ev = model.apply(variables, x, train=False)
  np.testing.assert_array_equal(ev, model.clone(drop_path=0.0).apply(variables, x, train=False))
  a = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
  b = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(3)})
  assert not np.allclose(a, ev) and not np.allclose(a, b)
  # Kept branches are scaled by 1 / (1 - rate): the expectation is unchanged.
  assert vit.drop_path(jnp.ones((1000, 1)), 0.5, jax.random.key(0)).mean() == pytest.approx(
      1.0, abs=0.1)


@pytest.fixture(scope="module")
def tiny(tiny_method):
  return tiny_method(_config(), batch_size=4, size=32, key=jax.random.key(0))

def test_teacher_gets_no_gradient_and_the_student_does(tiny):
  v = tiny["variables"]
  assert set(v["params"]) == set(v["target_params"]) == {"backbone", "projector"}
  assert "mask_token" in v["params"]["backbone"] and "pos_embed" not in v["params"]["backbone"]
  for g in jax.tree.leaves(tiny["target_grads"]):
    np.testing.assert_array_equal(g, 0.0)
  g = tiny["grads"]["backbone"]
  for name in ("mask_token", "patch_embed", "block0", "block1"):
    assert sum(float(np.abs(x).sum()) for x in jax.tree.leaves(g[name])) > 0, name
  m = tiny["out"].metrics
  assert np.isfinite(float(tiny["loss"])) and float(tiny["loss"]) > 0
  assert float(m["mask_ratio"]) == 0.75  # 4x4 grid, 2x2 squares: 3 of 4
  assert tiny["method"].views()[1].same_crop_as == "student"


def test_bad_configs_fail_before_compiling():
  for override, expected in (({"method.mask.kind": "grid"}, "mask.kind='grid'"),
                             ({"method.mask.ratio": 1.0}, "mask.ratio=1.0"),
                             ({"model.use_mask_token": False}, "use_mask_token=True"),
                             ({"method.mask.block": 3}, "mask.block=3"),
                             ({"model.name": "resnet18"}, "cannot be used by method 'conmim'")):
    with pytest.raises(ValueError, match=expected.replace("(", r"\(")):
      train.check_config(_config(**override), jax.device_count())


def test_recipes():
  c = _config("default")
  assert (c.model.name, c.model.pos_embed, c.model.rel_pos_bias, c.model.shared_rel_pos_bias,
          c.model.layer_scale, c.model.drop_path) == ("vit_b16", "none", True, True, 0.1, 0.0)
  assert (c.total_epochs, c.method.temperature, c.method.momentum, c.method.mask.ratio) == (
      800.0, 0.1, 0.996, 0.75)
  assert (c.optim.name, c.optim.b1, c.optim.b2, c.optim.weight_decay) == ("adamw", 0.9, 0.98,
                                                                          0.05)
  assert (c.method.hidden, c.method.dim, c.optim.clip_grad_norm) == (4096, 256, 1.0)
  s = _config("vit_s16")
  assert (s.model.name, s.total_epochs) == ("vit_s16", 300.0)
  presets = c.augment.presets
  assert presets.conmim_student.jitter_prob == presets.conmim_student.blur_prob == 0.0
  assert presets.conmim_teacher.solarize_prob > 0 and presets.conmim_teacher.grey_prob > 0


STEP = {"optim.name": "sgd", "optim.lr": 0.1, "optim.schedule": "constant",
        "method.momentum_schedule": "constant", "checkpoint_every_steps": 1}


def _one_step(config, mesh, batch):
  built = train.build(config, mesh, num_examples=64)
  init = jax.device_get(built.state.params)
  with jax.set_mesh(mesh):
    new_state, metrics = built.step(built.state, sharding.to_global(batch, mesh))
  update = jax.tree.map(lambda n, o: n - o, jax.device_get(new_state.params), init)
  return update, jax.device_get(metrics)


@pytest.mark.parametrize("kind", ["random", "blockwise"])
def test_one_and_eight_devices_give_the_same_step(kind):
  config = _config(**STEP, total_steps=3, **{"method.mask.kind": kind,
                                             "method.mask.min_patches": 4})
  views = methods_lib.create(config).views()
  batch = next(pipeline.create_iterator(config.data, views=views,
                                        global_batch_size=config.batch_size, seed=0))
  one = Mesh(np.array(jax.devices()[:1]), ("data",), axis_types=(AxisType.Auto,))
  u1, m1 = _one_step(config, one, batch)
  u8, m8 = _one_step(config, sharding.create_mesh(), batch)
  assert jax.device_count() == 8 and m1["train/finite"] == 1.0
  for key in ("train/loss", "train/patch_acc", "train/mask_ratio"):
    np.testing.assert_allclose(m1[key], m8[key], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u8)):
    assert np.linalg.norm(a - b) <= 1e-3 * np.linalg.norm(a) + 1e-6
  changed = [np.any(u != 0) for u in jax.tree.leaves(u1)]
  assert sum(changed) >= 0.8 * len(changed)


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train.run(_config(**STEP, total_steps=3), straight)
  train.run(_config(**STEP, total_steps=1), resumed)
  state = train.run(_config(**STEP, total_steps=3), resumed)
  assert int(state.step) == 3
  a, b = checkpoint.load_raw(straight)[1], checkpoint.load_raw(resumed)[1]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_test_config_trains_through_main_on_8_devices(tmp_path):
  cmd = [sys.executable, "-m", "dense_ssl.main", "--config=configs/conmim.py:test",
         f"--workdir={tmp_path}", "--config.total_steps=2"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "over 8 devices" in out.stderr
  assert "train/patch_acc=" in out.stderr and "train/loss=" in out.stderr


def _timm_relative_position_index(side):
  """timm's `gen_relative_position_index` for a side x side window, written out in numpy."""
  coords = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="ij")).reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (side - 1)
  rel[:, :, 0] *= 2 * side - 1
  num = (2 * side - 1)**2 + 3
  index = np.zeros((side * side + 1,) * 2, np.int64)
  index[1:, 1:] = rel.sum(-1)
  index[0, 0:], index[0:, 0], index[0, 0] = num - 3, num - 2, num - 1
  return index


@pytest.mark.parametrize("shared", [True, False])
def test_timm_beit_export_computes_our_tokens_in_torch(shared, tmp_path):
  """The exported state_dict through timm's Beit forward (global_pool="token"), written in
  torch ops, gives our tokens on garment images: names, BEiT's table indexing, the dropped key
  bias and LayerScale all checked by one forward; the bias table shared by all blocks (timm's
  use_shared_rel_pos_bias, ConMIM's default) or one per block."""
  torch = pytest.importorskip("torch")
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  from dense_ssl import export, models  # pylint: disable=import-outside-toplevel
  # vit_micro8, rel-pos, no abs positions, LS 0.1
  backbone = models.build(_config(**{"model.shared_rel_pos_bias": shared}).model)
  images = np.asarray(scenes.single_garments("probe_test", n=2, size=32, seed=1)[0])
  x = (images / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  shapes = jax.eval_shape(lambda: backbone.module.init(jax.random.key(0),
                                                       jnp.zeros((1, 32, 32, 3))))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: np.asarray(0.2 * rng.standard_normal(s.shape), np.float32),
                        shapes["params"])
  ours = np.asarray(backbone.module.apply({"params": params}, jnp.asarray(x, jnp.float32),
                                          train=False))
  variables = {"params": params, "batch_stats": {}}
  assert export.available_formats(backbone) == ["timm_beit"]
  path = export.export(backbone, variables, "timm_beit", str(tmp_path / "beit.pth"))
  sd = torch.load(path)
  assert "pos_embed" not in sd and "mask_token" not in sd

  def table_key(block):
    return ("rel_pos_bias" if shared else f"{block}.attn") + ".relative_position_bias_table"

  assert sd[table_key("blocks.0")].shape == (52, 2)
  assert ("blocks.0.attn.relative_position_bias_table" in sd) == (not shared)
  assert {"blocks.1.gamma_1", "blocks.1.attn.q_bias", "blocks.1.attn.v_bias"} <= set(sd)
  with pytest.raises(ValueError, match="timm_beit"):
    export.to_timm(params)

  heads, width = 2, 64
  t = torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32))
  w = sd["patch_embed.proj.weight"]
  h = F.conv2d(t, w, sd["patch_embed.proj.bias"], stride=8).flatten(2).transpose(1, 2)
  h = torch.cat([sd["cls_token"].expand(2, -1, -1), h], dim=1)
  index = torch.from_numpy(_timm_relative_position_index(4)).reshape(-1)
  norm = lambda y, p: F.layer_norm(y, (width,), sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-6)
  for b in range(2):
    p = f"blocks.{b}"
    y = norm(h, f"{p}.norm1")
    bias = torch.cat([sd[f"{p}.attn.q_bias"], torch.zeros(width), sd[f"{p}.attn.v_bias"]])
    q, k, v = F.linear(y, sd[f"{p}.attn.qkv.weight"], bias).reshape(
        2, 17, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    rel = sd[table_key(p)][index].reshape(17, 17, heads)
    attn = (q * (width // heads)**-0.5) @ k.transpose(-2, -1) + rel.permute(2, 0, 1)
    y = (attn.softmax(-1) @ v).transpose(1, 2).reshape(2, 17, width)
    h = h + sd[f"{p}.gamma_1"] * F.linear(y, sd[f"{p}.attn.proj.weight"],
                                          sd[f"{p}.attn.proj.bias"])
    y = F.gelu(F.linear(norm(h, f"{p}.norm2"), sd[f"{p}.mlp.fc1.weight"], sd[f"{p}.mlp.fc1.bias"]))
    h = h + sd[f"{p}.gamma_2"] * F.linear(y, sd[f"{p}.mlp.fc2.weight"], sd[f"{p}.mlp.fc2.bias"])
  theirs = norm(h, "norm").numpy()
  np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)


def test_linear_and_dense_probes_run_on_the_conmim_backbone(tiny):
  """The evaluators reach ConMIM's ViT (relative bias, no absolute positions) through the
  method, at the grid it was initialised on."""
  from dense_ssl import evaluate  # pylint: disable=import-outside-toplevel
  method, v = tiny["method"], tiny["variables"]
  variables = method.backbone_variables(v["params"], v["batch_stats"])
  assert "rel_pos" in variables["params"]  # the table shared by every block
  evals = evaluate.from_config(
      {"linear": {"type": "linear", "num_train": 64, "num_test": 32, "image_size": 32,
                  "steps": 20},
       "dense": {"type": "dense", "num_train": 16, "num_test": 8, "image_size": 32,
                 "steps": 5, "use_c4": False}}, method.backbone)
  out = evaluate.run_all(evals, variables)
  assert 0.0 <= out["linear/top1"] <= 1.0
  assert any(k.startswith("dense/") for k in out) and all(np.isfinite(list(out.values())))
