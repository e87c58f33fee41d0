"""SimCLR (Chen et al., ICML 2020) on ViTs, with DILEMMA (Sameni et al., 2022) as an option.

    python -m dense_ssl.main --config=configs/simclr.py --workdir=runs/simclr             # recipe
    python -m dense_ssl.main --config=configs/simclr.py:demo,dilemma --workdir=runs/demo  # CPU

Default = SimCLR's ImageNet recipe (paper §B.1 and its official code) on the ViT-S/16 backbone
DILEMMA pairs it with: batch 4096, LARS (momentum 0.9) lr 0.3 x batch/256, wd 1e-6, biases and
norm parameters excluded from decay and LARS adaptation, 100 epochs, 10 warm-up, cosine; NT-Xent
with T = 0.1 over the global batch; projector Linear -> BN -> ReLU -> Linear (2048 -> 128) with a
final BN (MoCo v3's SimCLR-style MLP); 224 px views, crop scale 0.08-1, colour distortion of
strength 1 (jitter 0.8/0.8/0.8/0.2 p=0.8, grey p=0.2), blur p=0.5, flip. Learned positions.

Variants (comma-separated): `dilemma`, `demo`, `test`, `fmnist_scenes` (see configs/mocov3.py).
"""

import ml_collections

from configs import common


def get_config(arg=None):
  c = common.base_config()
  c.model = common.vit_model("vit_s16")
  c.batch_size = 4096
  c.total_epochs = 100.0
  c.data.crop_scale = (0.08, 1.0)
  c.augment.presets = dict(simclr=common.preset(brightness=0.8, contrast=0.8, saturation=0.8,
                                                hue=0.2))
  c.method = ml_collections.ConfigDict(dict(
      name="simclr", module="", temperature=0.1, dim=128, hidden=2048, num_layers=2,
      bn="sync", bn_groups=1, dilemma=common.dilemma_block()))
  c.optim.update(dict(name="lars", lr=0.3, base_batch_size=256, momentum=0.9,
                      weight_decay=1e-6, warmup_epochs=10.0, no_decay=(r"bias$", r"scale$")))
  return common.apply_variant(c, arg, {"default": None, "dilemma": common.dilemma_on,
                                       # LARS' trust ratio sets the step per layer: the recipe's lr.
                                       **common.vit_head_variants()})
