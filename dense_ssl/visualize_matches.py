"""Draws learned versus geometric cell matches between two views of the same image.

    python -m dense_ssl.visualize_matches --workdir=W [--step=N] [--output=PNG]
        [--images=scenes|demo] [--num_pairs=4] [--image_size=128]

Each row shows view 1 and, to its right and half a view lower, view 2, with one line per query
cell of view 1 whose true match lies in view 2: the geometric ground truth (from the pipeline's
correspondence grids, `matchers.geometric`) in green, the learned match (argmax of backbone C5
similarity, as DenseCL) in orange and, when the run is HoughCL, the Hough-voted match of
revision 2 (METHODS.md §1b, the method's default; cells centred over the drawn pairs) in magenta
and revision 1's in grey. A learned line that coincides with the green one is a correct match. Titles give each matcher's accuracy (within
one cell, as `dense_ssl.evaluate.correspondence`). Without --output the figure is written to
`<workdir>/matches_<step>.png`.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence

import numpy as np
from absl import app, flags

from dense_ssl import extras
from dense_ssl.evaluate import correspondence
from dense_ssl.matchers import geometric

matplotlib = extras.require("matplotlib", "Drawing the matches (dense_ssl.visualize_matches)")
matplotlib.use("Agg")  # Files only: no display on training machines.
# pylint: disable=g-import-not-at-top,wrong-import-position
import matplotlib.pyplot as plt
from matplotlib.collections import LineCollection

COLOURS = {"truth": "#2ca02c", "argmax": "#ff7f0e", "hough": "#c000c0", "hough_v1": "#808080",
           "identity": "#1f77b4"}
_GAP = 8  # pixels between the two views


def cell_centres(index: np.ndarray, grid: int, size: int) -> np.ndarray:
  """(..., 2) (x, y) pixel centres of row-major cells `index` of an S x S grid on a view."""
  row, col = np.divmod(np.asarray(index), grid)
  return np.stack([(col + 0.5) * size / grid, (row + 0.5) * size / grid], axis=-1)


def view2_offset(size: int) -> np.ndarray:
  """(x, y) pixel offset of view 2 on the canvas: right of view 1 and half a view lower, so that
  the lines of one row of cells are parallel rather than on top of each other."""
  return np.array([size + _GAP, size // 2], np.float64)


def match_segments(match: np.ndarray, grid: int, size: int, cells: np.ndarray) -> np.ndarray:
  """(len(cells), 2, 2) line segments ((x1, y1), (x2, y2)) from query cell i of view 1 to its
  matched cell match[i] of view 2 (placed at `view2_offset`)."""
  start = cell_centres(cells, grid, size)
  end = cell_centres(match[cells], grid, size) + view2_offset(size)
  return np.stack([start, end], axis=1)


def draw_pair(ax: Any, view1: np.ndarray, view2: np.ndarray, matches: dict[str, np.ndarray],
              truth: np.ndarray, valid: np.ndarray, title: str) -> None:
  """One pair on `ax`: both views and a LineCollection per matcher (label = matcher name)."""
  size = view1.shape[0]
  grid = int(round(np.sqrt(truth.shape[0])))
  dx, dy = view2_offset(size).astype(int)
  canvas = np.full((dy + size, dx + size, 3), 255, np.uint8)
  canvas[:size, :size], canvas[dy:, dx:] = view1, view2
  ax.imshow(canvas)
  cells = np.flatnonzero(valid)
  for name, match in {"truth": truth, **matches}.items():
    style = dict(linewidths=2.5, alpha=0.5) if name == "truth" else dict(linewidths=1.2)
    ax.add_collection(LineCollection(match_segments(match, grid, size, cells),
                                     colors=COLOURS[name], label=name, **style))
  ax.set_title(title, fontsize=9)
  ax.set_axis_off()


def match_figure(backbone: Any, variables: Any, pairs: dict[str, np.ndarray], *,
                 matchers: Sequence[str] = ("argmax",)) -> plt.Figure:
  """Figure of learned vs geometric matches for every pair in `pairs` (one row each).

  Args:
    backbone: the method's `models.Backbone`.
    variables: its {"params", "batch_stats"} (`Method.backbone_variables`).
    pairs: `correspondence.make_pairs` output (view1/2 and their geometry keys).
    matchers: names in `correspondence.MATCHERS` to draw.
  """
  matches = correspondence.match_pairs(backbone, variables, pairs, matchers)
  overall = correspondence.score(matches, pairs)
  truth, valid = (np.asarray(a) for a in geometric(pairs["view1_coords"], pairs["view2_coords"],
                                                    pairs["view2_box"], pairs["view1_valid"]))
  n = len(pairs["view1"])
  fig, axes = plt.subplots(n, 1, figsize=(6, 4.2 * n + 0.6), squeeze=False)
  for i, ax in enumerate(axes[:, 0]):
    one = {k: v[i:i + 1] for k, v in pairs.items()}
    acc = correspondence.score({m: matches[m][i:i + 1] for m in matchers}, one)
    title = ", ".join(f"{m} {acc[f'{m}_acc']:.0%}" for m in matchers)
    draw_pair(ax, pairs["view1"][i], pairs["view2"][i], {m: matches[m][i] for m in matchers},
              truth[i], valid[i], f"pair {i}: {title} (chance {acc['chance_acc']:.0%})")
  summary = ", ".join(f"{m} {overall[f'{m}_acc']:.1%}" for m in matchers)
  fig.suptitle(f"{backbone.name}, {n} pairs: {summary} within one cell\n"
               f"(chance {overall['chance_acc']:.1%}); green = geometric truth", fontsize=10)
  axes[0, 0].legend(loc="upper right", fontsize=7)
  fig.tight_layout()
  return fig


def demo_or_scene_images(kind: str, num: int, seed: int) -> list[np.ndarray]:
  """`num` held-out fmnist scenes ("scenes") or embedded demo photos ("demo")."""
  if kind == "scenes":
    from dense_ssl.data import scenes  # pylint: disable=g-import-not-at-top
    return list(scenes.make_scenes(num, seed, "probe_test")["images"])
  if kind == "demo":
    from dense_ssl.data import sources  # pylint: disable=g-import-not-at-top  (TensorFlow)
    photos = sources.demo_photos()
    return [photos[(seed + i) % len(photos)] for i in range(num)]
  raise ValueError(f"--images={kind!r}; valid: scenes, demo.")


def run(workdir: str, step: int | None = None, output: str | None = None, *,
        images: str = "scenes", num_pairs: int = 4, image_size: int = 128, seed: int = 0) -> str:
  """Draws the matches of a run's checkpoint (Hough too for HoughCL); returns the PNG path."""
  from dense_ssl import checkpoint  # pylint: disable=g-import-not-at-top  (orbax)
  config = checkpoint.load_config_dict(workdir)
  step, backbone, variables = checkpoint.load_backbone(workdir, step)
  matchers = (("argmax", "hough", "hough_v1") if config["method"]["name"] == "houghcl"
              else ("argmax",))
  pairs = correspondence.make_pairs(demo_or_scene_images(images, num_pairs, seed), seed=seed,
                                    image_size=image_size, stride=backbone.stride)
  fig = match_figure(backbone, variables, pairs, matchers=matchers)
  output = output or os.path.join(workdir, f"matches_{step}.png")
  fig.savefig(output, dpi=120)
  plt.close(fig)
  return output


def _define_flags() -> None:
  # Only when run as a program: importing this module must not clash with other --workdir flags.
  flags.DEFINE_string("workdir", None, "The --workdir of a dense_ssl training run.",
                      required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
  flags.DEFINE_string("output", None, "PNG path (default <workdir>/matches_<step>.png).")
  flags.DEFINE_enum("images", "scenes", ["scenes", "demo"], "Held-out fmnist scenes or the "
                    "embedded demo photos.")
  flags.DEFINE_integer("num_pairs", 4, "Pairs (rows) to draw.")
  flags.DEFINE_integer("image_size", 128, "View side in pixels (grid = size / stride).")
  flags.DEFINE_integer("seed", 0, "Which images and crops.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  try:
    path = run(f.workdir, f.step, f.output, images=f.images, num_pairs=f.num_pairs,
               image_size=f.image_size, seed=f.seed)
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"wrote {path}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
