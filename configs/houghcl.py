"""HoughCL (Lee et al., 2021): the DenseCL loss with positives chosen by Hough voting.

    python -m dense_ssl.main --config=configs/houghcl.py --workdir=runs/houghcl
    python -m dense_ssl.main --config=configs/houghcl.py:demo --workdir=runs/demo_hough

Same recipes as configs/densecl.py (the paper pretrains like DenseCL); no extra parameters.
"""

from configs import common, densecl


def get_config(arg=None):
  c = common.base_config()
  c.method = common.moco_method(name="houghcl", loss_lambda=0.5, dense_chunk=4096)
  return common.apply_variant(c, arg, {"default": None, "coco": densecl.coco,
                                       "demo": common.demo_overrides,
                                       "test": common.test_overrides,
                                       "fmnist_scenes": common.fmnist_scenes_overrides})
