"""visualize_matches: the figure draws exactly the learned and geometric matches, as a PNG."""

import matplotlib.image
import numpy as np

from dense_ssl import matchers, models
from dense_ssl import visualize_matches as vm
from dense_ssl.data import scenes
from dense_ssl.evaluate import correspondence, features

MODEL = "resnet18"


def test_cell_centres_and_segments():
  np.testing.assert_allclose(vm.cell_centres(np.array([0, 5, 15]), 4, 128),
                             [[16, 16], [48, 48], [112, 112]])
  seg = vm.match_segments(np.array([3, 0, 0, 0]), grid=2, size=64, cells=np.array([0]))
  # Query cell 0 (top left of view 1) to key cell 3 (bottom right of view 2, drawn to the right
  # and half a view lower).
  np.testing.assert_allclose(seg, [[[16, 16], [64 + vm._GAP + 48, 32 + 48]]])


def test_match_figure_draws_the_matches_and_writes_a_png(tmp_path):
  images = scenes.make_scenes(3, seed=0, split="probe_test", size=96)["images"]
  pairs = correspondence.make_pairs(images, seed=0, image_size=128)
  backbone = models.Backbone(MODEL, models.get_backbone(MODEL))
  variables = features.init_variables(backbone)
  fig = vm.match_figure(backbone, variables, pairs, matchers=("argmax", "hough", "hough_v1"))

  learned = correspondence.match_pairs(backbone, variables, pairs)
  truth, valid = (np.asarray(a) for a in matchers.geometric(
      pairs["view1_coords"], pairs["view2_coords"], pairs["view2_box"], pairs["view1_valid"]))
  axes = [ax for ax in fig.axes if ax.collections]
  assert len(axes) == 3
  for i, ax in enumerate(axes):
    cells = np.flatnonzero(valid[i])
    assert len(cells) > 0
    drawn = {c.get_label(): c for c in ax.collections}
    assert set(drawn) == {"truth", "argmax", "hough", "hough_v1"}
    for name, match in (("truth", truth[i]), ("argmax", learned["argmax"][i]),
                        ("hough", learned["hough"][i]), ("hough_v1", learned["hough_v1"][i])):
      segments = np.asarray(drawn[name].get_segments())
      np.testing.assert_allclose(segments, vm.match_segments(match, 4, 128, cells))
    acc = correspondence.score({"argmax": learned["argmax"][i:i + 1]},
                               {k: v[i:i + 1] for k, v in pairs.items()})["argmax_acc"]
    assert f"argmax {acc:.0%}" in ax.get_title()
  overall = correspondence.score(learned, pairs)
  assert f"argmax {overall['argmax_acc']:.1%}" in fig._suptitle.get_text()

  path = tmp_path / "matches.png"
  fig.savefig(path)
  assert path.stat().st_size > 10_000
  png = matplotlib.image.imread(path)
  assert png.ndim == 3 and png.shape[0] > 300 and png[..., :3].std() > 0.05
