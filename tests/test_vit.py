"""Tests for dense_ssl.models.vit: token assembly (drop, position override, mask), shapes, init."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import skimage.transform

from dense_ssl import models
from dense_ssl.models import vit

KEY = jax.random.key(0, impl="rbg")
DILEMMA = pathlib.Path(__file__).parent / "data" / "parity" / "dilemma_case1.npz"


def photos(size: int) -> np.ndarray:
  out = []
  for img in (skimage.data.astronaut(), skimage.data.coffee()):
    img = skimage.transform.resize(img, (size, size), anti_aliasing=True)
    out.append((img.astype(np.float32) - 0.45) / 0.225)
  return np.stack(out)


def layer_norm(x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
  """LayerNorm at its initial affine parameters (scale 1, bias 0)."""
  x = np.asarray(x, np.float64)
  return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)


@pytest.fixture(scope="module")
def micro():
  model = models.get_backbone("vit_micro8", use_mask_token=True)
  x = jnp.asarray(photos(32))
  variables = jax.jit(lambda k: model.init(k, x))(KEY)
  apply = jax.jit(lambda v, x, keep, pos, mask: model.apply(v, x, keep_idx=keep, pos_idx=pos,
                                                            mask=mask))
  return model, variables, x, apply


def test_shapes_names_and_parameter_count():
  model = models.get_backbone("vit_s16")
  shapes = jax.eval_shape(lambda: model.init_with_output(KEY, jnp.zeros((2, 224, 224, 3))))
  out, variables = shapes
  assert out.shape == (2, 1 + 196, 384) and models.num_features("vit_s16") == 384
  assert models.family("vit_s16") == "vit" and models.family("resnet50") == "resnet"
  params = variables["params"]
  assert params["pos_embed"].shape == (1, 196, 384)  # No entry for cls (timm no_embed_class).
  assert params["cls_token"].shape == (1, 1, 384)
  assert "mask_token" not in params
  # timm vit_small_patch16_224 has 22,050,664 parameters; minus its classifier (384*1000+1000)
  # and the cls entry of its (1, 197, 384) pos_embed.
  count = sum(x.size for x in jax.tree.leaves(params))
  assert count == 22_050_664 - (384 * 1000 + 1000) - 384


def test_full_sequence_and_the_cls_token_has_no_position():
  # Without blocks the output is LayerNorm(tokens), which exposes the token assembly.
  model = vit.ViT(patch_size=8, width=32, depth=0, num_heads=2)
  x = jnp.asarray(photos(32))
  out, variables = jax.jit(lambda k: model.init_with_output(k, x))(KEY)
  params = variables["params"]
  # A random change (a constant one would vanish in the LayerNorm).
  shifted = {**params, "pos_embed": params["pos_embed"] + jax.random.normal(
      jax.random.key(3), params["pos_embed"].shape)}
  out2 = jax.jit(model.apply)({"params": shifted}, x)
  np.testing.assert_allclose(out2[:, 0], out[:, 0], rtol=1e-6)  # cls: unaffected.
  assert not np.allclose(out2[:, 1:], out[:, 1:], atol=1e-3)
  np.testing.assert_allclose(out[:, 0], np.repeat(layer_norm(params["cls_token"][0]), 2, axis=0),
                             rtol=1e-4, atol=1e-4)


def test_token_dropping_and_position_override_match_the_dilemma_vectors():
  """The ViT's token input equals DILEMMA's `tokens_in` for the vectors' kept/input positions."""
  case = np.load(DILEMMA)
  view = 0
  patches = case["patches"][view]  # (N, L, D) patch embeddings.
  n, num_patches, d = patches.shape
  s = int(case["S"])
  p = 4  # p * p * 3 = 48 >= D: a patch embedding that copies the first D pixel values.
  model = vit.ViT(patch_size=p, width=d, depth=0, num_heads=1)
  images = np.zeros((n, s * p, s * p, 3), np.float32)
  flat = np.zeros((n, num_patches, p * p * 3), np.float32)
  flat[..., :d] = patches
  images = flat.reshape(n, s, s, p, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(images.shape)
  variables = jax.jit(model.init)(KEY, images)
  kernel = np.zeros((p * p * 3, d), np.float32)
  kernel[:d] = np.eye(d)
  params = {**variables["params"],
            "patch_embed": {"kernel": kernel.reshape(p, p, 3, d), "bias": np.zeros(d, np.float32)},
            "pos_embed": case["pos_embed"][None].astype(np.float32)}
  out = model.apply({"params": params}, images, keep_idx=case["kept_pos"][view],
                    pos_idx=case["input_pos"][view])
  assert out.shape == (n, 1 + int(case["keep"]), d)
  np.testing.assert_allclose(out[:, 1:], layer_norm(case["tokens_in"][view]), rtol=1e-4,
                             atol=1e-4)
  # Some tokens really got another position's embedding in these vectors.
  assert (case["input_pos"][view] != case["kept_pos"][view]).any()


def test_kept_tokens_follow_keep_idx_order(micro):
  _, variables, x, apply = micro
  keep = jnp.array([[5, 0, 9, 15], [3, 12, 1, 7]], jnp.int32)
  perm = jnp.array([2, 0, 3, 1])
  out = apply(variables, x, keep, None, None)
  assert out.shape == (2, 5, 64)
  # Attention is permutation-equivariant: permuting the kept tokens permutes the outputs.
  out_perm = apply(variables, x, keep[:, perm], None, None)
  np.testing.assert_allclose(out_perm[:, 1:], out[:, 1:][:, perm], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out_perm[:, 0], out[:, 0], rtol=1e-4, atol=1e-4)
  # Default positions are the kept positions themselves.
  np.testing.assert_allclose(apply(variables, x, keep, keep, None), out, rtol=1e-5, atol=1e-5)
  # Keeping every patch in order is the full sequence.
  everything = jnp.broadcast_to(jnp.arange(16), (2, 16))
  np.testing.assert_allclose(apply(variables, x, everything, None, None),
                             apply(variables, x, None, None, None), rtol=1e-5, atol=1e-5)


def test_position_override_changes_only_what_it_should(micro):
  _, variables, x, apply = micro
  keep = jnp.array([[5, 0, 9, 15], [3, 12, 1, 7]], jnp.int32)
  wrong = keep.at[:, 1].set(jnp.array([14, 2]))
  out = apply(variables, x, keep, None, None)
  out_wrong = apply(variables, x, keep, wrong, None)
  assert not np.allclose(out_wrong, out, atol=1e-3)
  # pos_idx over the full sequence: the identity permutation of positions is the default.
  full = jnp.broadcast_to(jnp.arange(16), (2, 16))
  np.testing.assert_allclose(apply(variables, x, None, full, None),
                             apply(variables, x, None, None, None), rtol=1e-5, atol=1e-5)


def test_masked_patches_do_not_see_the_image(micro):
  _, variables, x, apply = micro
  rng = np.random.default_rng(0)
  mask = rng.random((2, 16)) < 0.6
  mask[:, 0] = True
  mask[:, 1] = False
  mask = jnp.asarray(mask)
  # Replace the pixels of masked patches by a different photo: nothing may change.
  other = jnp.asarray(photos(32)[::-1])
  pixel_mask = jnp.repeat(jnp.repeat(mask.reshape(2, 4, 4), 8, 1), 8, 2)[..., None]
  scrambled = jnp.where(pixel_mask, other, x)
  out = apply(variables, x, None, None, mask)
  np.testing.assert_allclose(apply(variables, scrambled, None, None, mask), out, rtol=1e-5,
                             atol=1e-5)
  # Without the mask the same change is visible, and the mask changes the output.
  assert not np.allclose(apply(variables, scrambled, None, None, None),
                         apply(variables, x, None, None, None), atol=1e-3)
  assert not np.allclose(out, apply(variables, x, None, None, None), atol=1e-3)
  # Mask, then drop: the kept tokens see the mask token where masked.
  keep = jnp.array([[0, 1, 2, 3], [0, 1, 2, 3]], jnp.int32)
  assert apply(variables, x, keep, None, mask).shape == (2, 5, 64)


def test_init_statistics(micro):
  _, variables, _, _ = micro
  params = variables["params"]
  fc = np.asarray(params["block1"]["mlp_fc1"]["kernel"])  # (64, 256)
  # timm: normal std 0.02 (its truncation at +-2 is absolute, so it never bites).
  assert abs(fc.std() / 0.02 - 1) < 0.05
  assert np.mean(np.abs(fc) > 2 * 0.02) > 0.03
  np.testing.assert_array_equal(params["block1"]["mlp_fc1"]["bias"], 0.0)
  assert abs(np.asarray(params["pos_embed"]).std() / 0.02 - 1) < 0.1
  assert np.abs(params["cls_token"]).max() < 1e-5
  assert params["mask_token"].shape == (1, 1, 64)
  scaled = vit.ViT(patch_size=8, width=32, depth=1, num_heads=2, layer_scale=0.1)
  p = jax.jit(lambda k: scaled.init(k, jnp.zeros((1, 16, 16, 3))))(KEY)["params"]
  np.testing.assert_array_equal(p["block0"]["ls1"], np.float32(0.1))


def test_bfloat16_and_errors(micro):
  _, variables, x, apply = micro
  model16 = models.get_backbone("vit_micro8", use_mask_token=True, dtype=jnp.bfloat16)
  out16 = jax.jit(model16.apply)(variables, x)
  assert out16.dtype == jnp.bfloat16
  out = apply(variables, x, None, None, None)
  assert float(jnp.abs(out16.astype(jnp.float32) - out).mean()) < 0.05
  plain = models.get_backbone("vit_micro8")
  with pytest.raises(ValueError, match="use_mask_token=True"):
    jax.eval_shape(lambda: plain.init(KEY, x, mask=jnp.zeros((2, 16), bool)))
  with pytest.raises(ValueError, match="divisible by the patch size"):
    jax.eval_shape(lambda: plain.init(KEY, jnp.zeros((1, 30, 30, 3))))
  with pytest.raises(ValueError, match="pos_idx has shape"):
    apply(variables, x, jnp.zeros((2, 4), jnp.int32), jnp.zeros((2, 5), jnp.int32), None)


def test_position_table_is_interpolated_to_other_crop_sizes():
  """Multi-crop: a ViT initialised at 32 px runs 16 px crops with its 4x4 table resized to
  2x2 (bicubic), exactly as a model whose table is that resized one."""
  from dense_ssl.models import vit  # pylint: disable=g-import-not-at-top
  model = vit.get("vit_micro8")
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  table = variables["params"]["pos_embed"]
  assert table.shape == (1, 16, 64)
  small = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  out = model.apply(variables, small)
  assert out.shape == (2, 1 + 4, 64)
  resized = vit.resize_pos_embed(table, (2, 2))
  assert resized.shape == (1, 4, 64)
  params = dict(variables["params"], pos_embed=resized)
  np.testing.assert_allclose(model.apply({"params": params}, small), out, rtol=1e-6, atol=1e-6)
  # A table on its own grid is returned as it is; a linear ramp stays a ramp in the interior.
  np.testing.assert_array_equal(vit.resize_pos_embed(table, (4, 4)), table)
  ramp = jnp.broadcast_to(jnp.arange(8.0)[:, None, None], (8, 8, 1)).reshape(1, 64, 1)
  half = vit.resize_pos_embed(ramp, (4, 4)).reshape(4, 4)
  np.testing.assert_allclose(np.diff(half[1:3, 0]), 2.0, rtol=1e-5)


def _moco_v3_sincos(side: int, width: int) -> np.ndarray:
  """moco-v3 vits.py `build_2d_sincos_position_embedding`, in numpy (torch.meshgrid is 'ij')."""
  grid_w, grid_h = np.meshgrid(np.arange(side, dtype=np.float64),
                               np.arange(side, dtype=np.float64), indexing="ij")
  pos_dim = width // 4
  omega = 1.0 / 10000.0**(np.arange(pos_dim) / pos_dim)
  out_w = np.einsum("m,d->md", grid_w.ravel(), omega)
  out_h = np.einsum("m,d->md", grid_h.ravel(), omega)
  return np.concatenate([np.sin(out_w), np.cos(out_w), np.sin(out_h), np.cos(out_h)], axis=1)


def test_sincos_position_table_is_moco_v3s_and_gets_no_gradient():
  model = vit.ViT(patch_size=8, width=32, depth=1, num_heads=2, pos_embed="sincos")
  x = jnp.asarray(photos(48))
  variables = jax.jit(model.init)(KEY, x)
  table = variables["params"]["pos_embed"]
  assert table.shape == (1, 36, 32)
  np.testing.assert_allclose(table[0], _moco_v3_sincos(6, 32), rtol=1e-5, atol=1e-6)
  grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2))(variables["params"])
  np.testing.assert_array_equal(grads["pos_embed"], 0.0)
  assert np.abs(grads["cls_token"]).max() > 0
  learned = vit.ViT(patch_size=8, width=32, depth=1, num_heads=2)
  g = jax.grad(lambda p: jnp.sum(learned.apply({"params": p}, x) ** 2))(
      jax.jit(learned.init)(KEY, x)["params"])
  assert np.abs(g["pos_embed"]).max() > 0
  with pytest.raises(ValueError, match="valid choices: learned, sincos"):
    jax.eval_shape(lambda: vit.ViT(8, 32, 1, 2, pos_embed="rope").init(KEY, x))
  with pytest.raises(ValueError, match="divisible by 4"):
    vit.sincos_table(4, 30)


@pytest.mark.parametrize("side,grid", [(14, (6, 6)), (4, (8, 8)), (14, (5, 7))])
def test_position_table_resizing_is_torch_bicubic(side, grid):
  """timm's resample_abs_pos_embed / DINO's interpolate_pos_encoding call torch's bicubic
  F.interpolate (A = -0.75, align_corners=False); jax.image.resize's Keys kernel differs by
  ~10 % of the values."""
  torch = pytest.importorskip("torch")
  table = np.random.default_rng(0).normal(size=(1, side * side, 8)).astype(np.float32)
  ours = np.asarray(vit.resize_pos_embed(jnp.asarray(table), grid)).reshape(*grid, 8)
  theirs = torch.nn.functional.interpolate(
      torch.from_numpy(table).reshape(1, side, side, 8).permute(0, 3, 1, 2), size=grid,
      mode="bicubic", align_corners=False).permute(0, 2, 3, 1)[0].numpy()
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
