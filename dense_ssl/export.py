r"""Exports a pretrained backbone to PyTorch users' formats: ResNets to torchvision/detectron2,
ViTs to timm.

    python -m dense_ssl.export --workdir=DIR --format=torchvision   # DIR/export/backbone_torchvision.pth
    python -m dense_ssl.export --workdir=DIR --format=detectron2    # DIR/export/backbone_detectron2.pkl
    python -m dense_ssl.export --workdir=DIR --format=timm          # DIR/export/backbone_timm.pth (ViT)

Options: `--step=N` exports checkpoint N instead of the latest, `--output=PATH` picks the file
(`.pth` is written with torch.save and needs `pip install "dense_ssl[torch]"`; `.pkl` is a plain
pickle of numpy arrays and needs nothing).

torchvision format: a ResNet `state_dict` (`conv1.weight`, `bn1.running_mean`, `layer1.0.conv1.
weight`, `layer1.0.downsample.0.weight`, ...) without `fc.*`, so

    model = torchvision.models.resnet50()
    missing, unexpected = model.load_state_dict(torch.load(path), strict=False)
    # missing == ["fc.weight", "fc.bias"], unexpected == []

The same file loads into mmdetection / mmsegmentation ResNets (`init_cfg=dict(type="Pretrained",
checkpoint=path)`), which use torchvision's names.

detectron2 format: `{"model": {name: np.ndarray}, "__author__": "dense_ssl", "matching_heuristics":
True}` with detectron2's ResNet names, as MoCo's and DenseCL's `convert-pretrain-to-detectron2.py`
write them: `stem.conv1.weight`, `stem.conv1.norm.{weight,bias,running_mean,running_var}`,
`res2.0.conv1.weight`, `res2.0.conv1.norm.*`, `res2.0.shortcut.weight`, `res2.0.shortcut.norm.*`,
... (`layerN` -> `res{N+1}`, `bnK` -> `convK.norm`, `downsample.0` -> `shortcut`, `downsample.1`
-> `shortcut.norm`). `matching_heuristics` lets detectron2 place them under `backbone.bottom_up.`
(FPN) or `backbone.` / `roi_heads.res5.` (C4).

Fine-tuning in detectron2, as in the DenseCL paper (and MoCo's `detection/` recipe). The weights
were trained on RGB images normalised with the ImageNet mean/std, and torchvision-style ResNets
stride in the 3x3 conv, so every run needs

    MODEL.WEIGHTS DIR/export/backbone_detectron2.pkl
    INPUT.FORMAT RGB
    MODEL.PIXEL_MEAN "[123.675, 116.280, 103.530]" MODEL.PIXEL_STD "[58.395, 57.120, 57.375]"
    MODEL.RESNETS.STRIDE_IN_1X1 False
    MODEL.RESNETS.NORM SyncBN        # BN is fine-tuned, synchronised across GPUs
    MODEL.BACKBONE.FREEZE_AT 0       # fine-tune the stem too

* VOC07+12 detection, Faster R-CNN R50-C4, 24k iterations, batch 16: MoCo's
  `detection/configs/pascal_voc_R_50_C4_24k_moco.yaml` (base `Base-RCNN-C4-BN.yaml`: SyncBN in
  the backbone and the res5 head `Res5ROIHeadsExtraNorm`, precise BN at test time):

      python train_net.py --config-file configs/pascal_voc_R_50_C4_24k_moco.yaml --num-gpus 8 \
          MODEL.WEIGHTS DIR/export/backbone_detectron2.pkl

  (that config already sets the pixel statistics, RGB and STRIDE_IN_1X1 above).
* COCO instance segmentation, Mask R-CNN R50-FPN, 1x schedule: detectron2's
  `configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml` plus the overrides above and
  `MODEL.FPN.NORM SyncBN` (MoCo/DenseCL use SyncBN in the new FPN layers too).

timm format (ViTs): a `timm` VisionTransformer `state_dict` (`cls_token`, `pos_embed`,
`patch_embed.proj.weight`, `blocks.0.norm1.weight`, `blocks.0.attn.qkv.weight`,
`blocks.0.attn.proj.weight`, `blocks.0.mlp.fc1.weight`, ..., `norm.weight`) without `head.*`:

    model = timm.create_model("vit_small_patch16_224")       # vit_tiny_/vit_base_patch16_224
    missing, unexpected = model.load_state_dict(torch.load(path), strict=False)
    # missing == ["head.weight", "head.bias"], unexpected == []  (or num_classes=0: strict)

Our class token gets no position embedding (timm's `no_embed_class`, as DILEMMA's ViT); timm's
default ViT adds `pos_embed[:, 0]` to it, so the export writes a zero there and the default
model computes exactly our features (tests/test_export.py: a functional PyTorch forward on a
photo). The table keeps the grid it was trained on (14 x 14 at 224 px); a model trained at
another size loads into `timm.create_model(..., img_size=<that size>)`. The attention's
query/key/value kernels (D, heads, head_dim) become timm's fused `qkv` (3D, D) rows [q; k; v],
head-major, as timm splits them; LayerScale is `ls1.gamma`/`ls2.gamma` (`init_values`); a
mask token (ConMIM) has no timm counterpart and is not exported. Inputs are normalised as in
training (ImageNet mean/std, RGB).

timm_beit format (ViTs with BEiT's relative position bias or no absolute positions, ConMIM):
a timm `Beit` `state_dict`, for `timm.create_model("beit_base_patch16_224", global_pool="token",
num_classes=0)` (our final norm is timm's per-token `norm`; `global_pool="avg"` would train a new
`fc_norm`): `blocks.i.attn.relative_position_bias_table` is our table as it is (BEiT's indexing),
`q_bias`/`v_bias` are our query/value biases and our key bias is dropped, which is exact (it
adds q·b_k to every logit of a query's row, which the softmax cancels); LayerScale is
`gamma_1`/`gamma_2`; `relative_position_index` is a non-persistent buffer in timm and not
written. A ViT writes the one of `timm`/`timm_beit` that fits it (`available_formats`).

Running statistics: flax updates the running variance with the biased batch variance where torch
uses the unbiased one (see `dense_ssl.models.resnet`); `num_batches_tracked` is written as 0
because BatchNorm with a momentum never reads it.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import re
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from dense_ssl import extras

# Per backbone family, the formats it exports to.
FORMATS = {"resnet": ("torchvision", "detectron2"), "vit": ("timm", "timm_beit")}

# Submodules of a block, in torchvision's state_dict order, and their torchvision names.
_BLOCK_LAYERS = (("conv1", "conv1"), ("bn1", "bn1"), ("conv2", "conv2"), ("bn2", "bn2"),
                 ("conv3", "conv3"), ("bn3", "bn3"), ("downsample_conv", "downsample.0"),
                 ("downsample_bn", "downsample.1"))
_BLOCK_NAME = re.compile(r"layer([1-4])_(\d+)")


def _layers(params: dict) -> list[tuple[tuple[str, ...], str]]:
  """(flax path, torchvision module name) of every conv/BN, in torchvision's order."""
  unknown = [k for k in params if k not in ("conv1", "bn1") and not _BLOCK_NAME.fullmatch(k)]
  if unknown or "conv1" not in params:
    raise ValueError(
        f"These params do not look like a dense_ssl ResNet (top-level keys {sorted(params)}); "
        "pass the backbone's own trees, e.g. state.params['backbone'], not the whole state.")
  out = [(("conv1",), "conv1"), (("bn1",), "bn1")]
  blocks = sorted((k for k in params if k.startswith("layer")),
                  key=lambda k: tuple(int(g) for g in _BLOCK_NAME.fullmatch(k).groups()))
  known = {flax_name for flax_name, _ in _BLOCK_LAYERS}
  for block in blocks:
    extra = set(params[block]) - known
    if extra:
      raise ValueError(f"Unexpected layers {sorted(extra)} in ResNet block {block!r}; "
                       "only torchvision's BasicBlock/Bottleneck layers can be exported.")
    stage, index = _BLOCK_NAME.fullmatch(block).groups()
    out += [((block, sub), f"layer{stage}.{index}.{torch_sub}")
            for sub, torch_sub in _BLOCK_LAYERS if sub in params[block]]
  return out


def _get(tree: dict, path: tuple[str, ...], what: str) -> dict:
  for key in path:
    if key not in tree:
      raise ValueError(f"{what} has no entry {'/'.join(path)}; pass the backbone's params and "
                       "batch_stats from the same model (state.batch_stats[...]['backbone']).")
    tree = tree[key]
  return tree


def _float32(x: Any) -> np.ndarray:
  # Plain float32 numpy: no jax arrays or ml_dtypes bfloat16 in a file read by torch/detectron2.
  return np.asarray(jax.device_get(x), dtype=np.float32)


def to_torchvision(params: dict, batch_stats: dict) -> dict[str, np.ndarray]:
  """The ResNet's flax variables as a torchvision ResNet state_dict (numpy, no `fc.*`).

  Args:
    params: the backbone module's own `params` tree (`conv1`, `bn1`, `layer1_0`, ...).
    batch_stats: the backbone module's own `batch_stats` tree (running mean/var).

  Returns an ordered dict in torchvision's state_dict order: conv kernels (kh, kw, in, out)
  become `weight` (out, in, kh, kw); BN scale/bias/mean/var become weight/bias/running_mean/
  running_var, plus `num_batches_tracked` (int64 0).
  """
  state = {}
  for path, name in _layers(params):
    p = _get(params, path, "params")
    if "kernel" in p:
      state[f"{name}.weight"] = np.ascontiguousarray(_float32(p["kernel"]).transpose(3, 2, 0, 1))
      continue
    s = _get(batch_stats, path, "batch_stats")
    state[f"{name}.weight"] = _float32(p["scale"])
    state[f"{name}.bias"] = _float32(p["bias"])
    state[f"{name}.running_mean"] = _float32(s["mean"])
    state[f"{name}.running_var"] = _float32(s["var"])
    state[f"{name}.num_batches_tracked"] = np.array(0, dtype=np.int64)
  return state


def detectron2_name(torchvision_name: str) -> str:
  """torchvision ResNet name -> detectron2 ResNet name (MoCo's conversion rules)."""
  name = torchvision_name
  match = re.match(r"layer(\d)\.", name)
  if match:
    name = f"res{int(match.group(1)) + 1}." + name[match.end():]
  else:
    name = "stem." + name
  name = re.sub(r"(^|\.)bn(\d)\.", r"\1conv\2.norm.", name)
  name = name.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")
  return name


def to_detectron2(params: dict, batch_stats: dict) -> dict[str, Any]:
  """The ResNet's flax variables as a detectron2 checkpoint dict (see the module docstring)."""
  model = {detectron2_name(k): v for k, v in to_torchvision(params, batch_stats).items()}
  return {"model": model, "__author__": "dense_ssl", "matching_heuristics": True}


def _linear(p: dict) -> tuple[np.ndarray, np.ndarray]:
  """flax Dense {kernel (in, out), bias} -> torch Linear (weight (out, in), bias)."""
  return np.ascontiguousarray(_float32(p["kernel"]).T), _float32(p["bias"])


def _timm_block(p: dict, prefix: str) -> dict[str, np.ndarray]:
  attn = p["attn"]
  width = _float32(attn["out"]["kernel"]).shape[-1]
  # (D, heads, head_dim) -> (D, D) -> torch (out, in); timm reads qkv rows as [q; k; v], each
  # head-major, which is the flattening of (heads, head_dim).
  qkv_w = [_float32(attn[n]["kernel"]).reshape(width, width).T for n in ("query", "key", "value")]
  qkv_b = [_float32(attn[n]["bias"]).reshape(width) for n in ("query", "key", "value")]
  out = {f"{prefix}.norm1.weight": _float32(p["norm1"]["scale"]),
         f"{prefix}.norm1.bias": _float32(p["norm1"]["bias"]),
         f"{prefix}.attn.qkv.weight": np.ascontiguousarray(np.concatenate(qkv_w)),
         f"{prefix}.attn.qkv.bias": np.concatenate(qkv_b),
         f"{prefix}.attn.proj.weight": np.ascontiguousarray(
             _float32(attn["out"]["kernel"]).reshape(width, width).T),
         f"{prefix}.attn.proj.bias": _float32(attn["out"]["bias"])}
  if "ls1" in p:
    out[f"{prefix}.ls1.gamma"] = _float32(p["ls1"])
  out[f"{prefix}.norm2.weight"] = _float32(p["norm2"]["scale"])
  out[f"{prefix}.norm2.bias"] = _float32(p["norm2"]["bias"])
  out[f"{prefix}.mlp.fc1.weight"], out[f"{prefix}.mlp.fc1.bias"] = _linear(p["mlp_fc1"])
  out[f"{prefix}.mlp.fc2.weight"], out[f"{prefix}.mlp.fc2.bias"] = _linear(p["mlp_fc2"])
  if "ls2" in p:
    out[f"{prefix}.ls2.gamma"] = _float32(p["ls2"])
  return out


def to_timm(params: dict, batch_stats: dict | None = None, *,
            check_positions: bool = True) -> dict[str, np.ndarray]:
  """The ViT's flax params as a timm VisionTransformer state_dict (numpy, no `head.*`; module
  docstring), in timm's state_dict order."""
  del batch_stats  # A ViT has none.
  blocks = sorted((k for k in params if re.fullmatch(r"block\d+", k)), key=lambda k: int(k[5:]))
  if "patch_embed" not in params or not blocks:
    raise ValueError(f"These params do not look like a dense_ssl ViT (top-level keys "
                     f"{sorted(params)}); pass the backbone's own tree, state.params['backbone'].")
  if check_positions and ("pos_embed" not in params or "rel_pos" in params
                          or "rel_pos" in params[blocks[0]]):
    raise ValueError("This ViT has BEiT's relative position bias or no absolute position "
                     "table, which timm's VisionTransformer lacks; export it as 'timm_beit'.")
  state = {"cls_token": _float32(params["cls_token"])}
  if "pos_embed" in params:
    pos = _float32(params["pos_embed"])
    # A zero position for the cls token: timm's default ViT adds it, ours has none.
    state["pos_embed"] = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
  state.update({"patch_embed.proj.weight": np.ascontiguousarray(
               _float32(params["patch_embed"]["kernel"]).transpose(3, 2, 0, 1)),
           "patch_embed.proj.bias": _float32(params["patch_embed"]["bias"])})
  for i, block in enumerate(blocks):
    state.update(_timm_block(params[block], f"blocks.{i}"))
  state["norm.weight"] = _float32(params["norm"]["scale"])
  state["norm.bias"] = _float32(params["norm"]["bias"])
  return state


def to_timm_beit(params: dict, batch_stats: dict | None = None) -> dict[str, np.ndarray]:
  """The ViT's flax params as a timm Beit state_dict (numpy, no `head.*`; module docstring)."""
  del batch_stats
  base = to_timm(params, check_positions=False)
  state = {}
  if "rel_pos" in params:  # one table for every block (timm's use_shared_rel_pos_bias=True)
    state["rel_pos_bias.relative_position_bias_table"] = _float32(params["rel_pos"]["table"])
  for key, value in base.items():
    block = re.match(r"(blocks\.\d+)\.(.*)", key)
    if not block:
      state[key] = value
      continue
    prefix, rest = block.groups()
    p = params[f"block{prefix.split('.')[1]}"]
    if rest == "attn.qkv.weight":
      width = value.shape[1]
      state[f"{prefix}.attn.qkv.weight"] = value
      state[f"{prefix}.attn.q_bias"] = _float32(p["attn"]["query"]["bias"]).reshape(width)
      state[f"{prefix}.attn.v_bias"] = _float32(p["attn"]["value"]["bias"]).reshape(width)
      if "rel_pos" in p:
        state[f"{prefix}.attn.relative_position_bias_table"] = _float32(p["rel_pos"]["table"])
    elif rest == "attn.qkv.bias":
      continue
    else:
      state[f"{prefix}.{ {'ls1.gamma': 'gamma_1', 'ls2.gamma': 'gamma_2'}.get(rest, rest)}"] = value
  return state


def _probe_size(backbone: Any, variables: dict[str, Any]) -> int:
  """An image side at which `backbone` creates the shapes of `variables`: a ViT's position
  table (or its first block's relative position bias window) is sized by the image it is
  initialised on."""
  if backbone.family != "vit":
    return 64
  params = variables.get("params", {})
  rel_pos = params.get("rel_pos", params.get("block0", {}).get("rel_pos"))
  if "pos_embed" not in params and rel_pos is not None:
    rows = np.shape(rel_pos["table"])[0]
    return (int(round((rows - 3)**0.5)) + 1) // 2 * backbone.stride
  table = np.shape(params.get("pos_embed", np.zeros((1, 16, 1))))
  return int(round(table[1]**0.5)) * backbone.stride


def check_backbone(backbone: Any, variables: dict[str, Any]) -> None:
  """Raises if `variables` are not exactly those of `backbone` (a `models.Backbone`)."""
  module = backbone.eval_module()
  size = _probe_size(backbone, variables)
  expected = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                                                train=False))
  expected = {"params": expected["params"], "batch_stats": expected.get("batch_stats", {})}
  for what in ("params", "batch_stats"):
    tree = variables.get(what, {})
    want = jax.tree_util.tree_flatten_with_path(jax.tree.map(np.shape, expected[what]))[0]
    got = jax.tree_util.tree_flatten_with_path(jax.tree.map(np.shape, tree))[0]
    if dict(want) != dict(got):
      missing = sorted(jax.tree_util.keystr(k) for k in set(dict(want)) - set(dict(got)))[:3]
      extra = sorted(jax.tree_util.keystr(k) for k in set(dict(got)) - set(dict(want)))[:3]
      raise ValueError(f"The checkpoint's backbone {what} do not match {backbone.name!r} "
                       f"(missing e.g. {missing}, unexpected e.g. {extra}, or other shapes); "
                       "check config.model.name of the run.")


def _torch_tensors(obj: Any) -> Any:
  import torch  # Only called after the import was checked.

  if isinstance(obj, dict):
    return {k: _torch_tensors(v) for k, v in obj.items()}
  if isinstance(obj, np.ndarray):
    return torch.from_numpy(np.array(obj))  # A writable copy, so torch does not warn.
  return obj


def save(obj: dict, path: str, format: str | None = None) -> None:  # pylint: disable=redefined-builtin
  """Writes `obj` (from `to_torchvision` / `to_detectron2`) as `.pth` (torch.save) or `.pkl`.

  Args:
    obj: a dict whose array leaves are numpy arrays.
    path: destination; its directory is created.
    format: "pth" or "pkl"; by default the extension of `path`.
  """
  format = format or os.path.splitext(path)[1].lstrip(".")
  if format not in ("pth", "pkl"):
    raise ValueError(f"Unknown file format {format!r} for {path!r}; use a .pth (torch.save) or "
                     ".pkl (pickle) path, or pass format='pth'|'pkl'.")
  if format == "pth":
    torch = extras.require("torch", f"Writing {path}")
    obj = _torch_tensors(obj)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if format == "pth":
    torch.save(obj, path)
  else:
    with open(path, "wb") as f:
      pickle.dump(obj, f)


def _check_format(format: str, family: str | None = None) -> None:  # pylint: disable=redefined-builtin
  valid = FORMATS.get(family, ()) if family else _all_formats()
  if format not in valid:
    what = f"a {family} backbone" if family else "dense_ssl"
    raise ValueError(f"Unknown export format {format!r} for {what}; valid formats: "
                     f"{', '.join(valid) or 'none yet'}.")


def _all_formats() -> list[str]:
  return list(dict.fromkeys(f for formats in FORMATS.values() for f in formats))


def available_formats(backbone: Any) -> list[str]:
  """The formats of `backbone`'s family that this machine can write (.pth needs torch)."""
  have_torch = importlib.util.find_spec("torch") is not None
  fitting = [f for f in FORMATS.get(backbone.family, ()) if _fits(backbone, f)]
  formats = [f for f in fitting if have_torch or not default_output("", f).endswith(".pth")]
  if not have_torch and len(formats) < len(fitting):
    logging.warning('torch is not installed: skipping the .pth exports (pip install '
                    '"dense_ssl[torch]").')
  return formats


def _fits(backbone: Any, format: str) -> bool:  # pylint: disable=redefined-builtin
  """Whether a ViT's timm export is `format`: BEiT's for relative bias or no position table."""
  if backbone.family != "vit" or format not in ("timm", "timm_beit"):
    return True
  beit = bool(getattr(backbone.module, "rel_pos_bias", False)) or (
      getattr(backbone.module, "pos_embed", "learned") == "none")
  return beit == (format == "timm_beit")


def default_output(workdir: str, format: str) -> str:  # pylint: disable=redefined-builtin
  """<workdir>/export/backbone_<format>.pth (torchvision, timm) or .pkl (detectron2)."""
  ext = "pkl" if format == "detectron2" else "pth"
  return os.path.join(workdir, "export", f"backbone_{format}.{ext}")


def export(backbone: Any, variables: dict[str, Any], format: str,  # pylint: disable=redefined-builtin
           output: str) -> str:
  """Checks `variables` against `backbone`, converts them to `format`, writes `output`."""
  _check_format(format, backbone.family)
  check_backbone(backbone, variables)
  convert = {"torchvision": to_torchvision, "detectron2": to_detectron2,
             "timm": to_timm, "timm_beit": to_timm_beit}[format]
  save(convert(variables["params"], variables.get("batch_stats", {})), output)
  return output


def run(workdir: str, format: str = "torchvision", output: str | None = None,  # pylint: disable=redefined-builtin
        step: int | None = None) -> str:
  """Exports the online backbone of the run in `workdir` (latest or `step`); returns the path."""
  _check_format(format)
  from dense_ssl import checkpoint  # Needs orbax; imported here so the converters do not.

  _, backbone, variables = checkpoint.load_backbone(workdir, step)
  output = output or default_output(workdir, format)
  export(backbone, variables, format, output)
  logging.info("Wrote the %s backbone in %s format to %s.", backbone.name, format, output)
  return output


def _define_flags() -> None:
  # Defined only when run as a program, so importing this module (e.g. from train.py, whose
  # entrypoint has its own --workdir) never clashes with other flag definitions.
  flags.DEFINE_string("workdir", None, "Training run directory (holds the checkpoints).",
                      required=True)
  flags.DEFINE_enum("format", "torchvision", _all_formats(), "Output layout.")
  flags.DEFINE_string("output", None, "Output file (.pth or .pkl); default "
                      "<workdir>/export/backbone_<format>.pth|.pkl.")
  flags.DEFINE_integer("step", None, "Checkpoint step to export; default the latest.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}.")
  f = flags.FLAGS
  print(run(f.workdir, f.format, f.output, f.step))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
