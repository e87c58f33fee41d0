"""Tests for dense_ssl.export: names, layouts and numerics of the PyTorch/detectron2 exports.

`data/torchvision_resnet50_keys.txt` is torchvision's ResNet-50 state_dict (names and shapes, in
order). torchvision cannot be installed beside this torch, so it was made by executing the class
definitions of `torchvision/models/resnet.py` from the torchvision 0.29.1 wheel with torch 2.13.0
and dumping `ResNet(Bottleneck, [3, 4, 6, 3]).state_dict()` (its header says the same).

The numerical check runs a ResNet written here from `torch.nn.functional` alone (conv2d,
batch_norm in eval mode, relu, max_pool2d), following torchvision's architecture and driven by the
exported state_dict keys, on a real photo, and compares it with the JAX forward.
"""

from __future__ import annotations

import os
import pathlib
import pickle
import subprocess
import sys

import flax
import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import skimage.transform

from dense_ssl import export
from dense_ssl import models

MANIFEST = pathlib.Path(__file__).parent / "data" / "torchvision_resnet50_keys.txt"
KEY = jax.random.key(0, impl="rbg")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def photos(size: int) -> np.ndarray:
  """Three real photos, resized and ImageNet-normalised, NHWC float32."""
  out = []
  for img in (skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()):
    img = skimage.transform.resize(img, (size, size), anti_aliasing=True)
    out.append((img.astype(np.float32) - IMAGENET_MEAN) / IMAGENET_STD)
  return np.stack(out)


def manifest() -> list[tuple[str, tuple[int, ...]]]:
  rows = []
  for line in MANIFEST.read_text().splitlines():
    if line and not line.startswith("#"):
      name, shape = line.split("\t")
      rows.append((name, tuple(int(d) for d in shape.strip("()").split(",") if d.strip())))
  return rows


def random_like_model(name: str) -> tuple[dict, dict]:
  """Variables with the model's structure, filled with random numbers (no init compile)."""
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(lambda: models.get_backbone(name).init(
      KEY, jnp.zeros((1, 64, 64, 3)), train=False))
  shapes = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)
  return shapes["params"], shapes["batch_stats"]


_TRAINED: dict[str, tuple[flax.linen.Module, dict, dict]] = {}


def trained_like(name: str) -> tuple[flax.linen.Module, dict, dict]:
  """A backbone with non-trivial weights and running statistics, like a trained one (cached).

  Conv kernels are drawn as torchvision initialises them, BN affine parameters are perturbed away
  from (1, 0), and the running statistics come from two train-mode forward passes on real photos.
  """
  if name not in _TRAINED:
    model = models.get_backbone(name)
    rng = np.random.default_rng(1)

    def draw(path, s):
      leaf = path[-1].key
      if leaf == "kernel":  # He normal, fan_out = kh * kw * out.
        return rng.normal(0.0, np.sqrt(2.0 / (s.shape[0] * s.shape[1] * s.shape[3])), s.shape)
      return (1.0 if leaf in ("scale", "var") else 0.0) + 0.2 * rng.standard_normal(s.shape)

    shapes = jax.eval_shape(lambda: model.init(KEY, jnp.zeros((1, 64, 64, 3)), train=False))
    params = jax.tree_util.tree_map_with_path(
        lambda p, s: jnp.asarray(draw(p, s), jnp.float32), shapes["params"])
    stats = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["batch_stats"])
    stats = jax.tree_util.tree_map_with_path(lambda p, s: s + (p[-1].key == "var"), stats)
    step = jax.jit(lambda s, x: model.apply({"params": params, "batch_stats": s}, x, train=True,
                                            mutable=["batch_stats"])[1]["batch_stats"])
    x = jnp.asarray(photos(64))
    for i in range(2):
      stats = step(stats, jnp.roll(x, i, axis=0) * (1.0 + 0.2 * i))
    _TRAINED[name] = (model, params, stats)
  return _TRAINED[name]


def torch_resnet(sd: dict, x):
  """torchvision's ResNet forward up to layer4, in eval mode, from a state_dict."""
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel

  def bn(y, name):
    return F.batch_norm(y, sd[f"{name}.running_mean"], sd[f"{name}.running_var"],
                        sd[f"{name}.weight"], sd[f"{name}.bias"], training=False, eps=1e-5)

  x = F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), "bn1"))
  x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
  for stage in range(1, 5):
    block = 0
    while f"layer{stage}.{block}.conv1.weight" in sd:
      p = f"layer{stage}.{block}"
      stride = 2 if stage > 1 and block == 0 else 1
      if f"{p}.conv3.weight" in sd:  # Bottleneck, stride on the 3x3 conv (v1.5).
        y = F.relu(bn(F.conv2d(x, sd[f"{p}.conv1.weight"]), f"{p}.bn1"))
        y = F.relu(bn(F.conv2d(y, sd[f"{p}.conv2.weight"], stride=stride, padding=1), f"{p}.bn2"))
        y = bn(F.conv2d(y, sd[f"{p}.conv3.weight"]), f"{p}.bn3")
      else:  # BasicBlock.
        y = F.relu(bn(F.conv2d(x, sd[f"{p}.conv1.weight"], stride=stride, padding=1), f"{p}.bn1"))
        y = bn(F.conv2d(y, sd[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
      if f"{p}.downsample.0.weight" in sd:
        x = bn(F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=stride), f"{p}.downsample.1")
      x = F.relu(y + x)
      block += 1
  return x


def test_torchvision_names_and_shapes_match_torchvision_resnet50():
  params, stats = random_like_model("resnet50")
  state = export.to_torchvision(params, stats)
  expected = [(k, s) for k, s in manifest() if not k.startswith("fc.")]
  assert len(expected) == 318
  # Same names, same shapes, same order as torchvision's state_dict.
  assert [(k, v.shape) for k, v in state.items()] == expected
  assert state["bn1.num_batches_tracked"].dtype == np.int64
  assert all(v.dtype == np.float32 for k, v in state.items() if "num_batches" not in k)


def _moco_rename(name: str) -> str:
  """The renaming rules of MoCo's detection/convert-pretrain-to-detectron2.py, as plain replaces."""
  if "layer" not in name:
    name = "stem." + name
  for t in (1, 2, 3, 4):
    name = name.replace(f"layer{t}", f"res{t + 1}")
  for t in (1, 2, 3):
    name = name.replace(f"bn{t}", f"conv{t}.norm")
  return name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


@pytest.mark.parametrize("name", ["resnet50", "resnet18"])
def test_detectron2_names_follow_the_moco_converter(name):
  params, stats = random_like_model(name)
  tv = export.to_torchvision(params, stats)
  d2 = export.to_detectron2(params, stats)
  assert d2["__author__"] == "dense_ssl" and d2["matching_heuristics"] is True
  assert list(d2["model"]) == [_moco_rename(k) for k in tv]
  for k, v in tv.items():
    np.testing.assert_array_equal(d2["model"][_moco_rename(k)], v)
  if name == "resnet50":
    for k in ("stem.conv1.weight", "stem.conv1.norm.running_var", "res2.0.shortcut.weight",
              "res2.0.shortcut.norm.bias", "res5.2.conv3.norm.weight", "res4.5.conv2.weight"):
      assert k in d2["model"], k
    assert d2["model"]["res5.0.shortcut.weight"].shape == (2048, 1024, 1, 1)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_pytorch_forward_of_the_exported_weights_matches_jax(name, tmp_path):
  torch = pytest.importorskip("torch")
  size = 64
  model, params, stats = trained_like(name)
  path = str(tmp_path / "backbone.pth")
  export.save(export.to_torchvision(params, stats), path)
  sd = torch.load(path)
  assert all(isinstance(v, torch.Tensor) for v in sd.values())
  img = photos(size)[:1]
  jax_out = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(
      {"params": params, "batch_stats": stats}, img))
  with torch.no_grad():
    torch_out = torch_resnet(sd, torch.from_numpy(img.transpose(0, 3, 1, 2).copy())).numpy()
  torch_out = torch_out.transpose(0, 2, 3, 1)
  assert torch_out.shape == jax_out.shape == (1, 2, 2, models.num_features(name))
  scale = np.abs(jax_out).max()
  assert scale > 0.1
  np.testing.assert_allclose(torch_out, jax_out, rtol=1e-4, atol=1e-4 * scale)
  # The running statistics really were used (they differ from the initial 0 / 1).
  assert np.abs(sd["layer1.0.bn1.running_mean"].numpy()).max() > 1e-2


def test_detectron2_pickle_is_plain_numpy(tmp_path):
  _, params, stats = trained_like("resnet18")
  path = str(tmp_path / "d2" / "backbone.pkl")
  export.save(export.to_detectron2(params, stats), path)
  with open(path, "rb") as f:
    obj = pickle.load(f, encoding="latin1")  # As detectron2's checkpointer reads it.
  assert set(obj) == {"model", "__author__", "matching_heuristics"}
  assert all(type(v) is np.ndarray for v in obj["model"].values())
  tv = export.to_torchvision(params, stats)
  np.testing.assert_array_equal(obj["model"]["res3.0.shortcut.norm.running_var"],
                                tv["layer2.0.downsample.1.running_var"])
  np.testing.assert_array_equal(obj["model"]["stem.conv1.weight"],
                                np.transpose(params["conv1"]["kernel"], (3, 2, 0, 1)))


def test_bad_inputs_are_named(tmp_path):
  params, stats = random_like_model("resnet18")
  with pytest.raises(ValueError, match="backbone's own trees"):
    export.to_torchvision({"backbone": params}, stats)
  with pytest.raises(ValueError, match="batch_stats"):
    export.to_torchvision(params, {})
  with pytest.raises(ValueError, match="do not match 'resnet34'"):
    export.check_backbone(models.Backbone("resnet34", models.get_backbone("resnet34")),
                          {"params": params, "batch_stats": stats})
  with pytest.raises(ValueError, match=r"\.pth .* \.pkl"):
    export.save({}, str(tmp_path / "x.npz"))
  with pytest.raises(ValueError, match="torchvision, detectron2"):
    export.run(str(tmp_path), format="onnx")


def test_cli_exports_a_training_checkpoint(tmp_path):
  """`python -m dense_ssl.export` on a workdir written with dense_ssl.checkpoint."""
  ml_collections = pytest.importorskip("ml_collections")
  from dense_ssl import checkpoint  # pylint: disable=import-outside-toplevel

  @flax.struct.dataclass
  class State:
    step: int
    params: dict
    batch_stats: dict

  _, params, stats1 = trained_like("resnet18")
  stats2 = jax.tree.map(lambda s: s + 1.0, stats1)
  workdir = str(tmp_path / "run")
  from dense_ssl import config_errors  # pylint: disable=import-outside-toplevel
  del ml_collections
  checkpoint.save_config(workdir, config_errors.load_config("configs/mocov2.py:test"))
  manager = checkpoint.create_manager(workdir, keep=2, every_steps=1)
  for step, stats in ((1, stats1), (2, stats2)):
    checkpoint.save(manager, State(step=jnp.asarray(step), params={"backbone": params},
                                   batch_stats={"online": {"backbone": stats}}), force=True)
  manager.wait_until_finished()
  manager.close()

  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-m", "dense_ssl.export", f"--workdir={workdir}",
                           "--format=detectron2"], capture_output=True, text=True, env=env,
                          cwd=pathlib.Path(__file__).parents[1], check=False, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  default = os.path.join(workdir, "export", "backbone_detectron2.pkl")
  assert result.stdout.strip().splitlines()[-1] == default
  with open(default, "rb") as f:
    latest = pickle.load(f)["model"]
  np.testing.assert_allclose(latest["stem.conv1.norm.running_mean"],
                             np.asarray(stats2["bn1"]["mean"]), rtol=1e-6)

  # In process, an older step, and an explicit output path.
  out = export.run(workdir, format="detectron2", step=1, output=str(tmp_path / "s1.pkl"))
  with open(out, "rb") as f:
    older = pickle.load(f)["model"]
  np.testing.assert_allclose(older["stem.conv1.norm.running_mean"],
                             np.asarray(stats1["bn1"]["mean"]), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# ViTs to timm.
# ---------------------------------------------------------------------------------------------

TIMM_MANIFEST = pathlib.Path(__file__).parent / "data" / "timm_vit_small_patch16_224_keys.txt"


def random_vit(name: str, size: int, **options) -> tuple[models.Backbone, dict]:
  """A ViT backbone and params drawn away from init (LayerNorm affine, positions, biases), so
  every converted tensor matters in the forward."""
  backbone = models.Backbone(name, models.get_backbone(name, **options))
  shapes = jax.eval_shape(lambda: backbone.module.init(KEY, jnp.zeros((1, size, size, 3))))
  rng = np.random.default_rng(3)

  def draw(path, s):
    leaf = path[-1].key
    if leaf == "scale" or leaf.startswith("ls"):
      return 1.0 + 0.3 * rng.standard_normal(s.shape)
    fan_in = np.prod(s.shape[:-1]) if leaf == "kernel" and len(s.shape) > 1 else 1
    std = 1.0 / np.sqrt(fan_in) if leaf == "kernel" else 0.1
    return std * rng.standard_normal(s.shape)

  params = jax.tree_util.tree_map_with_path(lambda p, s: np.asarray(draw(p, s), np.float32),
                                            shapes["params"])
  return backbone, params


def torch_vit(sd: dict, x, num_heads: int):
  """timm's VisionTransformer forward (class token, pre-norm blocks, final norm), from
  `torch.nn.functional` alone, driven by the state_dict; returns all tokens."""
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  w = sd["patch_embed.proj.weight"]
  x = F.conv2d(x, w, sd["patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
  x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd["pos_embed"]
  width = x.shape[-1]
  norm = lambda y, p: F.layer_norm(y, (width,), sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-6)
  block = 0
  while f"blocks.{block}.norm1.weight" in sd:
    p = f"blocks.{block}"
    y = norm(x, f"{p}.norm1")
    n, length, _ = y.shape
    qkv = F.linear(y, sd[f"{p}.attn.qkv.weight"], sd[f"{p}.attn.qkv.bias"])
    q, k, v = qkv.reshape(n, length, 3, num_heads, width // num_heads).permute(2, 0, 3, 1, 4)
    attn = torch.softmax(q @ k.transpose(-2, -1) * (width // num_heads)**-0.5, dim=-1)
    y = (attn @ v).transpose(1, 2).reshape(n, length, width)
    y = F.linear(y, sd[f"{p}.attn.proj.weight"], sd[f"{p}.attn.proj.bias"])
    x = x + y * sd.get(f"{p}.ls1.gamma", 1.0)
    y = norm(x, f"{p}.norm2")
    y = F.gelu(F.linear(y, sd[f"{p}.mlp.fc1.weight"], sd[f"{p}.mlp.fc1.bias"]))
    y = F.linear(y, sd[f"{p}.mlp.fc2.weight"], sd[f"{p}.mlp.fc2.bias"])
    x = x + y * sd.get(f"{p}.ls2.gamma", 1.0)
    block += 1
  return norm(x, "norm")


def test_timm_names_and_shapes_match_vit_small_patch16_224():
  rows = []
  for line in TIMM_MANIFEST.read_text().splitlines():
    if line and not line.startswith("#"):
      name, shape = line.split("\t")
      rows.append((name, tuple(int(d) for d in shape.split(","))))
  assert sum(int(np.prod(s)) for _, s in rows) == 22_050_664
  _, params = random_vit("vit_s16", 224)
  state = export.to_timm(params)
  # timm's names, shapes and order, without the classifier (load_state_dict(strict=False)
  # reports exactly head.weight and head.bias missing).
  assert [(k, v.shape) for k, v in state.items()] == [r for r in rows
                                                      if not r[0].startswith("head.")]
  assert all(v.dtype == np.float32 for v in state.values())
  np.testing.assert_array_equal(state["pos_embed"][0, 0], 0.0)  # the cls token's position
  np.testing.assert_array_equal(state["pos_embed"][0, 1:], params["pos_embed"][0])


@pytest.mark.parametrize("name,size,options,heads", [
    ("vit_s16", 224, {}, 6),
    ("vit_micro8", 48, {"layer_scale": 0.1, "use_mask_token": True}, 2),
])
def test_timm_forward_of_the_exported_weights_matches_jax(name, size, options, heads, tmp_path):
  """The exported file, loaded with torch, through timm's forward (written out in torch ops),
  gives our tokens on a photo: ViT-S/16 at 224 (the default timm model), and a ViT with
  LayerScale trained at 48 px (its table on a 6 x 6 grid; the mask token is not exported)."""
  torch = pytest.importorskip("torch")
  backbone, params = random_vit(name, size, **options)
  path = export.export(backbone, {"params": params, "batch_stats": {}}, "timm",
                       str(tmp_path / "backbone_timm.pth"))
  sd = torch.load(path)
  assert "mask_token" not in sd and ("blocks.0.ls1.gamma" in sd) == bool(options)
  img = photos(size)[:1]
  ours = np.asarray(jax.jit(backbone.eval_module().apply)({"params": params}, img))
  with torch.no_grad():
    theirs = torch_vit(sd, torch.from_numpy(img.transpose(0, 3, 1, 2).copy()), heads).numpy()
  assert theirs.shape == ours.shape == (1, 1 + (size // backbone.stride)**2,
                                        backbone.num_features)
  np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4 * np.abs(ours).max())


def test_timm_export_rejects_other_trees():
  with pytest.raises(ValueError, match="dense_ssl ViT"):
    export.to_timm({"backbone": {}})
  backbone, params = random_vit("vit_micro8", 32)
  export.check_backbone(backbone, {"params": params})  # its own 4 x 4 table is fine
  with pytest.raises(ValueError, match="do not match 'vit_ti16'"):
    export.check_backbone(models.Backbone("vit_ti16", models.get_backbone("vit_ti16")),
                          {"params": params})
  with pytest.raises(ValueError, match="valid formats: timm"):
    export.export(backbone, {"params": params}, "torchvision", "/tmp/never.pth")
