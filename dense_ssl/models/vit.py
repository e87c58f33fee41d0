"""A Vision Transformer for token-level SSL methods (DILEMMA, ConMIM, MoCo v3).

The token pipeline exposes the three corruptions those methods need:

    patches  = patch_embed(image)                              (N, L, D), row-major cells
    patches  = where(mask, mask_token, patches)                ConMIM: `mask` (N, L) bool
    content  = patches[keep_idx]                               token dropping: `keep_idx` (N, K)
    tokens   = content + pos_embed[pos_idx]                    DILEMMA: `pos_idx` (N, K), which
                                                               may differ from `keep_idx`
    tokens   = [cls_token, tokens]                             cls gets no positional embedding
    output   = norm(blocks(tokens))                            (N, 1 + K, D)

The cls token gets no positional embedding and `pos_embed` has shape (1, L, D), as timm's
`no_embed_class=True`, which DILEMMA relies on: every positional embedding belongs to a patch
position, so a token can be given another position's embedding.

Position embeddings (`pos_embed`): "learned" (timm/DINO/DILEMMA: a table initialised normal
std 0.02) or "sincos" (MoCo v3: a fixed 2-D sine-cosine table, [sin(r·ω), cos(r·ω), sin(c·ω),
cos(c·ω)] for the token in row r, column c, ω_d = 10000^(-d / (D/4)), MoCo v3's
`build_2d_sincos_position_embedding` on square grids). Both live in params as `pos_embed`, so
both interpolate to other crop grids and export alike; the sin-cos table gets no gradient here
and must be frozen in the optimiser (`config.optim.frozen`), or weight decay would shrink it.

Blocks are timm's pre-norm blocks (LayerNorm eps 1e-6, exact GELU, qkv with bias), optionally
with LayerScale (ConMIM/BEiT use 0.1), BEiT's relative position bias and stochastic depth:

* `rel_pos_bias`: per block, a learned (heads,) bias for every relative offset (dy, dx) of two
  patches, plus three entries for cls->patch, patch->cls and cls->cls, added to the attention
  logits; BEiT's table of (2W-1)² + 3 rows indexed as BEiT's `relative_position_index`. It is
  zero at init (BEiT's), so a fresh model computes what it computes without it. The table is
  sized by the grid of `init`; any smaller grid reads its offsets from the same table exactly
  (every offset of a smaller grid is an offset of the larger), so no interpolation is needed.
  BEiT runs it without absolute positions (`pos_embed="none"`). With `shared_rel_pos_bias`
  one table at the ViT's top level (`rel_pos`) serves every block instead: BEiT's
  `use_shared_rel_pos_bias`, which ConMIM's pre-training turns on by default.
* `drop_path`: the stochastic-depth rate of the last block, linearly from 0 at the first (timm's
  `dpr`); each residual branch is dropped per example with that probability when `train`, and
  the kept ones scaled by 1 / (1 - rate). It draws from the "dropout" rng; off in eval. Initialisation follows timm: Linear layers normal std
0.02 (timm's trunc_normal_ with absolute bounds +-2) with zero bias, pos_embed and mask_token
the same, cls_token normal std 1e-6, the patch embedding PyTorch's default Conv2d init.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dense_ssl.models import heads

# timm's trunc_normal_(std=.02) truncates at the absolute values +-2, i.e. at 100 standard
# deviations: in effect a plain normal (jax's truncated_normal would cut at 2 std).
_normal_002 = nn.initializers.normal(stddev=0.02)


def relative_position_index(side: int) -> np.ndarray:
  """BEiT's `relative_position_index` of a side x side grid: (1 + L, 1 + L) rows of the table
  of a window `side` (token 0 is cls; the last three rows are cls->patch, patch->cls, cls->cls)."""
  return relative_position_index_in(side, side)


def relative_position_index_in(grid: int, window: int) -> np.ndarray:
  """The index of a grid x grid input into the table of a larger `window` (module doc)."""
  rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
  coords = np.stack([rows.reshape(-1), cols.reshape(-1)])  # (2, L)
  rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # (2, L, L), shifted to >= 0
  distances = (2 * window - 1)**2 + 3
  index = np.zeros((grid * grid + 1,) * 2, np.int32)
  index[1:, 1:] = rel[0] * (2 * window - 1) + rel[1]
  index[0, :] = distances - 3
  index[:, 0] = distances - 2
  index[0, 0] = distances - 1
  return index


def resize_offset_table(table: jax.Array, window: int) -> jax.Array:
  """A BEiT bias table ((2w-1)^2 + 3, heads) resized bilinearly to a `window` x `window` grid;
  the three class-token entries are kept. The zero offset stays at the centre, where pixel
  centres of both sizes coincide, so it is read unchanged."""
  side, heads = int(round((table.shape[0] - 3)**0.5)), table.shape[1]
  offsets = table[:-3].reshape(side, side, heads)
  offsets = jax.image.resize(offsets, (2 * window - 1, 2 * window - 1, heads), "bilinear")
  return jnp.concatenate([offsets.reshape(-1, heads), table[-3:]], axis=0)


class RelativePositionBias(nn.Module):
  """BEiT's per-block relative position bias: (heads, 1 + L, 1 + L) for a square grid."""

  num_heads: int

  @nn.compact
  def __call__(self, grid: tuple[int, int]) -> jax.Array:
    if grid[0] != grid[1]:
      raise ValueError(f"The relative position bias needs a square token grid, got {grid}; "
                       "use square crops.")
    # The table keeps the window it was initialised on; smaller grids index into it, larger
    # ones read it resized (BEiT resizes the table to fine-tune at a higher resolution).
    rows = (self.get_variable("params", "table").shape[0]
            if self.has_variable("params", "table") else (2 * grid[0] - 1)**2 + 3)
    window = int(round((rows - 3)**0.5 + 1)) // 2
    table = self.param("table", nn.initializers.zeros, (rows, self.num_heads))
    if grid[0] > window:
      table = resize_offset_table(table, grid[0])
      window = grid[0]
    index = relative_position_index_in(grid[0], window)
    return jnp.transpose(jnp.take(table, jnp.asarray(index), axis=0), (2, 0, 1))


def drop_path(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """Stochastic depth: zeroes each example's residual branch with probability `rate` and
  scales the kept ones by 1 / (1 - rate); the identity without an rng or at rate 0."""
  if rng is None or rate <= 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

  num_heads: int
  mlp_ratio: float = 4.0
  layer_scale: float | None = None
  dtype: Any = jnp.float32
  rel_pos_bias: bool = False
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, grid: tuple[int, int] | None = None,
               train: bool = False, bias: jax.Array | None = None) -> jax.Array:
    """`bias`: a (heads, 1 + L, 1 + L) attention bias from outside (the shared table)."""
    width = x.shape[-1]

    def scaled(y, name):
      if self.layer_scale is not None:
        gamma = self.param(name, nn.initializers.constant(self.layer_scale), (width,))
        y = y * gamma.astype(y.dtype)
      dropping = train and self.drop_path > 0.0
      return drop_path(y, self.drop_path, self.make_rng("dropout") if dropping else None)

    attention_fn = nn.dot_product_attention
    if self.rel_pos_bias:
      bias = RelativePositionBias(self.num_heads, name="rel_pos")(grid)
    if bias is not None:
      attention_fn = functools.partial(nn.dot_product_attention, bias=bias.astype(self.dtype))
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm1")(x)
    y = nn.MultiHeadDotProductAttention(self.num_heads, dtype=self.dtype,
                                        kernel_init=_normal_002, deterministic=True,
                                        attention_fn=attention_fn, name="attn")(y, y)
    x = x + scaled(y, "ls1")
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm2")(x)
    y = nn.Dense(int(width * self.mlp_ratio), kernel_init=_normal_002, dtype=self.dtype,
                 name="mlp_fc1")(y)
    y = nn.gelu(y, approximate=False)  # torch.nn.GELU() is the exact erf form.
    y = nn.Dense(width, kernel_init=_normal_002, dtype=self.dtype, name="mlp_fc2")(y)
    return x + scaled(y, "ls2")


class ViT(nn.Module):
  """ViT returning every token after the final LayerNorm: (N, 1 + K, D), cls first.

  Attributes:
    patch_size: side of the square patches; the image sides must be multiples of it. The
      position table is sized by the image given to `init`; other sizes are interpolated.
    width: token dimension D.
    depth: number of blocks.
    num_heads: attention heads per block.
    mlp_ratio: MLP hidden width / D.
    layer_scale: initial LayerScale value, or None for no LayerScale.
    use_mask_token: create the learned `mask_token` (needed for `mask=`).
    pos_embed: "learned", "sincos" (the string option; the table itself is the param of
      the same name) or "none" (BEiT with `rel_pos_bias`: no absolute positions).
    rel_pos_bias: BEiT's relative position bias in every block (module doc).
    shared_rel_pos_bias: with `rel_pos_bias`, one table for all blocks (module doc).
    drop_path: the stochastic-depth rate of the last block (module doc); 0 = off.
    dtype: computation dtype; parameters stay float32.
  """

  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  layer_scale: float | None = None
  use_mask_token: bool = False
  pos_embed: str = "learned"
  rel_pos_bias: bool = False
  shared_rel_pos_bias: bool = False
  drop_path: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True, *, keep_idx: jax.Array | None = None,
               pos_idx: jax.Array | None = None, mask: jax.Array | None = None) -> jax.Array:
    """Encodes images (N, H, W, 3).

    Args:
      x: normalised NHWC images.
      train: training mode: stochastic depth (`drop_path`) is on, drawing from the "dropout"
        rng; no other effect (no BatchNorm).
      keep_idx: (N, K) int, the patch positions kept (token dropping), in any order; the
        output's patch tokens follow this order. Default: all L patches in row-major order.
      pos_idx: (N, K) int (or (N, L) without keep_idx), the position whose embedding each
        kept token receives. Default: its own position (`keep_idx`).
      mask: (N, L) bool, True where the patch embedding is replaced by the mask token
        (applied before dropping). Needs `use_mask_token=True`.

    Returns the tokens after the final LayerNorm, (N, 1 + K, D) in `dtype`; token 0 is cls.
    """
    n, h, w, c = x.shape
    p = self.patch_size
    if c != 3 or h % p or w % p:
      raise ValueError(f"ViT expects NHWC RGB images with sides divisible by the patch size "
                       f"{p}, got {x.shape}; resize or crop to a multiple of {p}.")
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID",
                kernel_init=heads.torch_conv_kernel_init,
                bias_init=heads.torch_bias_init(p * p * c), dtype=self.dtype,
                name="patch_embed")(jnp.asarray(x, self.dtype))
    x = x.reshape(n, -1, self.width)
    num_patches = x.shape[1]

    if self.use_mask_token:
      mask_token = self.param("mask_token", _normal_002, (1, 1, self.width))
    if mask is not None:
      if not self.use_mask_token:
        raise ValueError("mask= needs a learned mask token: build the ViT with "
                         "use_mask_token=True.")
      _check_shape("mask", mask, (n, num_patches))
      x = jnp.where(mask[..., None], mask_token.astype(x.dtype), x)

    if self.pos_embed not in POS_EMBEDS:
      raise ValueError(f"Unknown ViT pos_embed={self.pos_embed!r} (config.model.pos_embed); "
                       f"valid choices: {', '.join(POS_EMBEDS)}.")
    if keep_idx is not None and self.rel_pos_bias:
      raise ValueError("Token dropping (keep_idx) leaves no grid for the relative position "
                       "bias; set config.model.rel_pos_bias=False to drop tokens.")
    if keep_idx is not None:
      _check_shape("keep_idx", keep_idx, (n, keep_idx.shape[-1]))
      x = jnp.take_along_axis(x, keep_idx[..., None], axis=1)
    positions = keep_idx if pos_idx is None else pos_idx
    if self.pos_embed == "none":
      if pos_idx is not None:
        raise ValueError("pos_idx= assigns position embeddings, but this ViT has none "
                         "(pos_embed='none'); use config.model.pos_embed='learned'.")
    else:
      # The table keeps the size of the grid it was initialised on; other grids interpolate it.
      table_len = (self.get_variable("params", "pos_embed").shape[1]
                   if self.has_variable("params", "pos_embed") else num_patches)
      init = _normal_002 if self.pos_embed == "learned" else sincos_init
      pos_embed = self.param("pos_embed", init, (1, table_len, self.width))
      if self.pos_embed == "sincos":  # fixed, as MoCo v3's requires_grad=False
        pos_embed = jax.lax.stop_gradient(pos_embed)
      pos_embed = resize_pos_embed(pos_embed, (h // p, w // p))
      if positions is None:
        x = x + pos_embed.astype(x.dtype)
      else:
        _check_shape("pos_idx", positions, x.shape[:2])
        x = x + jnp.take(pos_embed[0], positions, axis=0).astype(x.dtype)

    cls = self.param("cls_token", nn.initializers.normal(stddev=1e-6), (1, 1, self.width))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (n, 1, self.width)), x], axis=1)
    if self.shared_rel_pos_bias and not self.rel_pos_bias:
      raise ValueError("shared_rel_pos_bias shares the relative position bias, which is off; "
                       "set config.model.rel_pos_bias=True as well.")
    shared = self.rel_pos_bias and self.shared_rel_pos_bias
    bias = (RelativePositionBias(self.num_heads, name="rel_pos")((h // p, w // p))
            .astype(self.dtype) if shared else None)
    for i in range(self.depth):
      rate = self.drop_path * i / max(self.depth - 1, 1)
      x = Block(self.num_heads, self.mlp_ratio, self.layer_scale, self.dtype,
                rel_pos_bias=self.rel_pos_bias and not shared, drop_path=rate,
                name=f"block{i}")(x, (h // p, w // p), train, bias)
    return nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")(x)


POS_EMBEDS = ("learned", "sincos", "none")


def sincos_table(side: int, width: int, temperature: float = 10000.0) -> jax.Array:
  """MoCo v3's 2-D sin-cos embedding of a side x side grid, (side², width), row-major tokens."""
  if width % 4:
    raise ValueError(f"A 2-D sin-cos position embedding needs a width divisible by 4, got "
                     f"{width}; use pos_embed='learned'.")
  quarter = width // 4
  omega = 1.0 / temperature**(jnp.arange(quarter, dtype=jnp.float32) / quarter)
  rows, cols = jnp.meshgrid(jnp.arange(side, dtype=jnp.float32),
                            jnp.arange(side, dtype=jnp.float32), indexing="ij")
  out_r = rows.reshape(-1, 1) * omega
  out_c = cols.reshape(-1, 1) * omega
  return jnp.concatenate([jnp.sin(out_r), jnp.cos(out_r), jnp.sin(out_c), jnp.cos(out_c)], 1)


def sincos_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
  """Initialiser of a (1, L, D) `pos_embed` param with the sin-cos table of its square grid."""
  del key
  side = int(round(shape[1]**0.5))
  if side * side != shape[1]:
    raise ValueError(f"A sin-cos position table needs a square grid, got {shape[1]} tokens.")
  return sincos_table(side, shape[2]).reshape(shape).astype(dtype)


def _bicubic_matrix(size_in: int, size_out: int, a: float = -0.75) -> np.ndarray:
  """(out, in) weights of torch's bicubic resampling along one axis (align_corners=False,
  A = -0.75, border taps clamped, no antialiasing), as `F.interpolate(size=...)` computes it."""
  def near(x):  # |x| <= 1
    return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a

  matrix = np.zeros((size_out, size_in), np.float64)
  scale = size_in / size_out
  for out in range(size_out):
    src = scale * (out + 0.5) - 0.5
    base = int(np.floor(src))
    t = src - base
    for offset, weight in ((-1, far(t + 1.0)), (0, near(t)), (1, near(1.0 - t)),
                           (2, far(2.0 - t))):
      matrix[out, min(max(base + offset, 0), size_in - 1)] += weight
  return matrix


def resize_pos_embed(pos_embed: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """The (1, g0·g0, D) table on a (gh, gw) grid (multi-crop: DINO's 96 px local crops of a
  224 px model), bicubic exactly as torch's `F.interpolate(size=grid, mode="bicubic",
  align_corners=False)`: timm's `resample_abs_pos_embed` without antialiasing, and DINO's
  `interpolate_pos_encoding` but for its +0.1 in the scale factor.

  The table's own size is fixed at `init` by the first image seen; other sizes interpolate.
  """
  length, width = pos_embed.shape[1], pos_embed.shape[2]
  if length == grid[0] * grid[1]:
    return pos_embed
  side = int(round(length**0.5))
  if side * side != length:
    raise ValueError(f"pos_embed of {length} positions is not a square grid; cannot resize it "
                     f"to {grid}.")
  table = pos_embed.reshape(side, side, width).astype(jnp.float32)
  rows = jnp.asarray(_bicubic_matrix(side, grid[0]), jnp.float32)
  cols = jnp.asarray(_bicubic_matrix(side, grid[1]), jnp.float32)
  resized = jnp.einsum("ai,bj,ijd->abd", rows, cols, table,
                       precision=jax.lax.Precision.HIGHEST)
  return resized.reshape(1, grid[0] * grid[1], width).astype(pos_embed.dtype)


def _check_shape(name: str, value: jax.Array, shape: tuple[int, ...]) -> None:
  if tuple(value.shape) != tuple(shape):
    raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(shape)} "
                     "(batch, tokens); see ViT.__call__.")


# name -> (patch_size, width, depth, num_heads). `vit_micro8` is for tests and CPU demos.
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "vit_micro8": (8, 64, 2, 2),
    "vit_ti16": (16, 192, 12, 3),
    "vit_s16": (16, 384, 12, 6),
    "vit_b16": (16, 768, 12, 12),
}


def get(name: str, **kwargs: Any) -> ViT:
  patch, width, depth, num_heads = VARIANTS[name]
  return ViT(patch_size=patch, width=width, depth=depth, num_heads=num_heads, **kwargs)


def num_features(name: str) -> int:
  return VARIANTS[name][1]
