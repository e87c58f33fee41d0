"""HoughCL (Lee et al., 2021): the DenseCL loss with positives chosen by Hough voting.

    python -m dense_ssl.main --config=configs/houghcl.py --workdir=runs/houghcl
    python -m dense_ssl.main --config=configs/houghcl.py:demo --workdir=runs/demo_hough
    python -m dense_ssl.main --config=configs/houghcl.py:demo --config.method.hough_revision=1 ...

Same recipes as configs/densecl.py (the paper pretrains like DenseCL). The matcher has no
learnable parameters; its settings are METHODS.md §1b's (revision 2): votes ReLU(cos)^3, a 3x3
Gaussian over the Hough space, κ = 3, no mirrored offsets. `hough_revision=1` selects §1.
"""

from configs import common, densecl


def get_config(arg=None):
  c = common.base_config()
  c.method = common.moco_method(name="houghcl", loss_lambda=0.5, dense_chunk=4096,
                                hough_revision=2, hough_power=3.0, hough_smooth_side=3,
                                hough_kappa=3.0, hough_mirror=False)
  return common.apply_variant(c, arg, {"default": None, "coco": densecl.coco,
                                       "demo": common.demo_overrides,
                                       "test": common.test_overrides,
                                       "fmnist_scenes": common.sgd_fmnist_scenes_overrides})
