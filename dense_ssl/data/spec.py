"""What a method asks the input pipeline for: its views, and the arrays each one carries.

Pure Python (no TensorFlow), so methods, the trainer and the benchmarks can describe and size
batches on machines without the input pipeline. `dense_ssl.data.views` builds the views on the
host; `dense_ssl.data.augment` colour-augments them on device, each by its preset.

A batch is a flat dict. For a view named `v`:

    v           uint8 (B, size, size, 3)  the crop, resized and maybe flipped
    v_box       float32 (B, 4)            the crop (y0, x0, y1, x1) in normalised image coordinates
    v_flip      bool (B,)                 whether the crop was flipped
    v_coords    float32 (B, S, S, 2)      with `grid`: each output cell's centre (y, x) in
    v_valid     bool (B, S, S)              normalised image coordinates, and whether it is inside
    v_mask      bool (B, S, S)            with `mask`: the token mask (True = masked)

A crop sampler (`ViewSpec` sets are sampled by `dense_ssl.data.views.SAMPLERS[name]`) may add
keys of its own; it declares them through `sampler_keys`. UniVIP's sampler
("overlap_proposals", `dense_ssl.data.instances`) reads instance views named
`instance_view(scene, k)` and adds, per scene view `v`,

    v_inst_boxes       float32 (B, K, 4)  the K instance boxes in v's normalised coordinates
    proposal_fallback  bool (B,)          no crop pair held K proposals: random boxes instead
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np


PROPOSAL_FALLBACK = "proposal_fallback"


def instance_view(scene: str, k: int) -> str:
  """The name of instance view k (an object crop) of scene view `scene`."""
  return f"{scene}_inst{k}"


def instance_boxes_key(scene: str) -> str:
  """The batch key of scene view `scene`'s instance boxes, in its own coordinates."""
  return f"{scene}_inst_boxes"


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """A random token mask over a view's grid: `ratio` of the cells, in square blocks.

  `block` > 1 masks whole `block` x `block` groups of cells (ConMIM's `random_mps32` on a ViT-/16
  is block 2: 32 px squares), ceil(ratio · blocks) of them; the grid side must be a multiple of
  `block`.
  """
  ratio: float = 0.75
  block: int = 1


@dataclasses.dataclass(frozen=True)
class ViewSpec:
  """One view of each image, as a method needs it.

  Attributes:
    name: the batch key of the image (and prefix of its geometry keys).
    size: output side in pixels.
    scale, ratio: RandomResizedCrop ranges (area fraction; aspect ratio w/h).
    flip: whether the crop may be flipped horizontally (p = 0.5).
    preset: name of the colour-augmentation preset, a key of `config.augment.presets`.
    grid: cells per side of the correspondence grid (0 = no grid). Set it from the backbone:
      size // stride for a ResNet's C5 map, size // patch for a ViT.
    mask: a token mask over the `grid` (None = no mask).
    same_crop_as: another view's name: reuse its crop window and flip (ConMIM's teacher sees
      the student's crop with a stronger colour preset).
  """
  name: str
  size: int
  scale: tuple[float, float] = (0.2, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip: bool = True
  preset: str = "mocov2"
  grid: int = 0
  mask: MaskSpec | None = None
  same_crop_as: str | None = None


def check_views(views: Sequence[ViewSpec], presets: Any = None) -> None:
  """Raises ValueError for duplicate names, bad sizes, masks without grids, unknown references.

  `presets`, when given, is `config.augment.presets` (anything with `in`); every view's preset
  must be one of its keys.
  """
  if not views:
    raise ValueError("A method must declare at least one view.")
  names = [v.name for v in views]
  if len(set(names)) != len(names):
    raise ValueError(f"View names must be unique, got {names}.")
  taken = {f"{n}_{suffix}" for n in names for suffix in ("box", "flip", "coords", "valid", "mask")}
  clash = sorted(taken & set(names))
  if clash:
    raise ValueError(f"View names {clash} clash with other views' geometry keys.")
  for v in views:
    if v.size <= 0:
      raise ValueError(f"View {v.name!r} has size {v.size}; sizes must be positive.")
    if not 0 < v.scale[0] <= v.scale[1] <= 1.0 or not 0 < v.ratio[0] <= v.ratio[1]:
      raise ValueError(f"View {v.name!r}: crop scale {v.scale} must lie in (0, 1] and ratio "
                       f"{v.ratio} be positive, each (low, high).")
    if v.grid < 0 or (v.grid and v.size % v.grid):
      raise ValueError(f"View {v.name!r}: grid {v.grid} must divide its size {v.size}.")
    if v.mask is not None:
      if not v.grid:
        raise ValueError(f"View {v.name!r} has a token mask but no grid; set its grid.")
      if v.mask.block < 1 or v.grid % v.mask.block or not 0.0 <= v.mask.ratio <= 1.0:
        raise ValueError(f"View {v.name!r}: mask block {v.mask.block} must divide grid "
                         f"{v.grid} and the ratio {v.mask.ratio} lie in [0, 1].")
    if v.same_crop_as is not None:
      source = next((w for w in views if w.name == v.same_crop_as), None)
      if source is None or source.same_crop_as is not None:
        raise ValueError(f"View {v.name!r}: same_crop_as={v.same_crop_as!r} must name another "
                         f"view that samples its own crop; views: {names}.")
    if presets is not None and v.preset not in presets:
      valid = ", ".join(sorted(presets)) if hasattr(presets, "__iter__") else "?"
      raise ValueError(f"View {v.name!r} uses the augmentation preset {v.preset!r}, which "
                       f"config.augment.presets does not define; defined: {valid}.")


def batch_shapes(views: Sequence[ViewSpec], batch: int,
                 sampler_keys: dict[str, tuple[tuple[int, ...], Any]] | None = None
                 ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{key: (shape, dtype)} of a batch of `batch` examples with these views (see module doc).

  `sampler_keys` adds the crop sampler's own keys, each (per-example shape, dtype).
  """
  out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
  for v in views:
    out[v.name] = ((batch, v.size, v.size, 3), np.dtype(np.uint8))
    out[f"{v.name}_box"] = ((batch, 4), np.dtype(np.float32))
    out[f"{v.name}_flip"] = ((batch,), np.dtype(bool))
    if v.grid:
      out[f"{v.name}_coords"] = ((batch, v.grid, v.grid, 2), np.dtype(np.float32))
      out[f"{v.name}_valid"] = ((batch, v.grid, v.grid), np.dtype(bool))
    if v.mask is not None:
      out[f"{v.name}_mask"] = ((batch, v.grid, v.grid), np.dtype(bool))
  for key, (shape, dtype) in (sampler_keys or {}).items():
    out[key] = ((batch, *shape), np.dtype(dtype))
  return out


def example_batch(shapes: dict[str, tuple[tuple[int, ...], Any]],
                  rows: int | None = None) -> dict[str, np.ndarray]:
  """A batch of the given `{key: (shape, dtype)}` (e.g. `batch_shapes`) with neutral values:
  zero images, whole-image boxes, valid cells. `rows` replaces the batch size."""
  out = {}
  for key, (shape, dtype) in shapes.items():
    value = np.zeros(shape if rows is None else (rows, *shape[1:]), dtype)
    if key.endswith("_box"):
      value[:] = (0.0, 0.0, 1.0, 1.0)
    elif key.endswith("_valid"):
      value[:] = True
    out[key] = value
  return out
