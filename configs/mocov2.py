"""MoCo-v2 (Chen et al., 2020) on ResNet: the baseline DenseCL builds on.

    python -m dense_ssl.main --config=configs/mocov2.py --workdir=runs/mocov2       # paper recipe
    python -m dense_ssl.main --config=configs/mocov2.py:demo --workdir=runs/demo    # CPU, minutes

Default = ImageNet recipe: ResNet-50, 200 epochs, batch 256, SGD lr 0.03 momentum 0.9 wd 1e-4,
cosine, T=0.2, queue 65536, momentum 0.999, MoCo-v2 augmentation, shuffle-BN (8 groups of 32 as
on 8 GPUs). Variants: `demo` (embedded photos, ResNet-18/128), `test` (tiny).
"""

from configs import common


def get_config(arg=None):
  c = common.base_config()
  c.method = common.moco_method()
  return common.apply_variant(c, arg, {"default": None, "demo": common.demo_overrides,
                                       "test": common.test_overrides,
                                       "fmnist_scenes": common.sgd_fmnist_scenes_overrides})
