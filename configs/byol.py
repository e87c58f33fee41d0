"""BYOL (Grill et al., NeurIPS 2020) on ResNet: the base UniVIP builds on.

    python -m dense_ssl.main --config=configs/byol.py --workdir=runs/byol         # ImageNet recipe
    python -m dense_ssl.main --config=configs/byol.py:demo --workdir=runs/demo    # CPU, minutes

Default = the ImageNet recipe of the paper's 300-epoch runs: ResNet-50, batch 4096, LARS
(momentum 0.9, trust coefficient 1e-3) with lr 0.2 x batch/256, weight decay 1.5e-6, biases and
BatchNorm parameters excluded from both the decay and the LARS adaptation, 10 warm-up epochs
then cosine; projector 2048->4096->256 and predictor 256->4096->256 (BN, ReLU); target EMA
0.99 -> 1 on a cosine; random resized crops (scale 0.08-1) at 224 with BYOL's asymmetric colour
augmentation (blur p 1.0 / 0.1, solarise p 0 / 0.2); cross-replica (global) BatchNorm.
Variants: `demo` (embedded photos, ResNet-18/128), `test` (tiny), `fmnist_scenes` (the
reproduction benchmark's protocol, configs/common.py).
"""

import ml_collections

from configs import common


def byol_presets() -> dict:
  """BYOL's two views: jitter (0.4, 0.4, 0.2, 0.1) p 0.8, grey p 0.2; blur p 1.0 / 0.1
  (sigma 0.1-2, kernel 10% of the side: 23 at 224), solarise p 0 / 0.2."""
  jitter = dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, jitter_prob=0.8,
                grey_prob=0.2, blur_sigma=(0.1, 2.0))
  return dict(byol1=common.preset(blur_prob=1.0, solarize_prob=0.0, **jitter),
              byol2=common.preset(blur_prob=0.1, solarize_prob=0.2, **jitter))


def byol_recipe(c: ml_collections.ConfigDict, name: str = "byol", **method) -> None:
  """The BYOL method block, views, LARS and its exclusions on a `common.base_config()`."""
  c.method = ml_collections.ConfigDict(dict(
      name=name, module="", momentum=0.99, momentum_schedule="cosine", dim=256, hidden=4096,
      bn="sync", bn_groups=1, **method))
  c.data.crop_scale = (0.08, 1.0)
  c.augment.presets = byol_presets()
  c.optim.update(dict(name="lars", lr=0.2, base_batch_size=256, momentum=0.9,
                      weight_decay=1.5e-6, warmup_epochs=10.0, schedule="cosine",
                      # Biases and BatchNorm (scale, bias) get no decay and no LARS ratio.
                      no_decay=(r"bias$", r"scale$")))


def demo(c):
  common.demo_overrides(c)
  c.optim.warmup_epochs = 1.0  # 64 steps of the 300
  c.method.dim = 128


def test(c):
  common.test_overrides(c)
  c.optim.warmup_epochs = 0.0


def fmnist_scenes(c):
  common.fmnist_scenes_overrides(c)
  c.data.crop_scale = (0.2, 1.0)  # the protocol's crops: 0.08 of a 96 px scene is 27 px
  c.optim.warmup_epochs = 0.5  # 156 of the 2000 steps
  # LARS moves each layer by about lr x trust (1e-3) of its norm per step. The linear rule at
  # batch 32 (0.2 x 32/256 = 0.025) gives 2.5e-5: 2000 steps leave the weights where they
  # started and only BatchNorm's statistics change (RESULTS §4g). At an unscaled 1.0 a step
  # moves them by ~2e-3, as SGD at lr 0.05 moves MoCo-v2's.
  c.optim.update(dict(lr=1.0, base_batch_size=0))
  c.method.dim = 128


VARIANTS = {"default": None, "demo": demo, "test": test, "fmnist_scenes": fmnist_scenes}


def get_config(arg=None):
  c = common.base_config()
  c.batch_size = 4096
  c.total_epochs = 300.0
  byol_recipe(c)
  return common.apply_variant(c, arg, VARIANTS)
