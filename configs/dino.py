"""DINO (Caron et al., ICCV 2021) on ViTs, with DILEMMA (Sameni et al., 2022) as an option.

    python -m dense_ssl.main --config=configs/dino.py --workdir=runs/dino                 # recipe
    python -m dense_ssl.main --config=configs/dino.py:demo,dilemma --workdir=runs/demo    # CPU

Default = the official ViT-S/16 recipe (main_dino.py's defaults with the README's ViT-S/16
settings): 2 global crops at 224 px (scale 0.4-1) and 10 local crops at 96 px (scale 0.05-0.4);
global1 blur p=1, global2 blur p=0.1 + solarize p=0.2, locals blur p=0.5 (jitter 0.4/0.4/0.2/0.1
p=0.8, grey p=0.2, flip); head 3 layers (2048) -> 256 -> 65536, weight-normalised last layer
with its norm fixed (norm_last_layer) and frozen during epoch 1; centre momentum 0.9; teacher
temperature 0.04 -> 0.07 over 30 epochs, student 0.1; EMA 0.996 -> 1 (cosine); AdamW lr 5e-4 x
batch/256 with 10 warm-up epochs then cosine (to 0, where DINO stops at min_lr 1e-6), weight
decay 0.04 -> 0.4 (cosine) except biases and norm parameters; gradients clipped to norm 3 per
parameter tensor (DINO's clip_gradients, `optim.clip_grad_per_tensor`); batch 1024 (16 x 64),
100 epochs. Not reproduced: stochastic depth (drop_path 0.1) in the student.

Variants (comma-separated): `dilemma`, `demo`, `test`, `fmnist_scenes` (see configs/mocov3.py);
the small variants keep 2 global + a few local crops at half the global side.
"""

import ml_collections

from configs import common


def dino_presets() -> dict:
  jitter = dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
  return dict(dino_global1=common.preset(**jitter, blur_prob=1.0),
              dino_global2=common.preset(**jitter, blur_prob=0.1, solarize_prob=0.2),
              dino_local=common.preset(**jitter, blur_prob=0.5))


def _small(c, out_dim, hidden, bottleneck, local_crops, local_size):
  c.method.update(dict(out_dim=out_dim, hidden=hidden, bottleneck=bottleneck,
                       local_crops=local_crops, local_size=local_size,
                       warmup_teacher_temp_epochs=0))
  c.optim.freeze_early_epochs = 0.0


def demo(c):
  common.vit_demo_overrides(c)
  _small(c, out_dim=1024, hidden=256, bottleneck=64, local_crops=4, local_size=32)
  c.optim.lr = 4e-3
  c.optim.warmup_epochs = 0.5
  c.optim.freeze_early_epochs = 0.5


def test(c):
  common.vit_test_overrides(c)
  _small(c, out_dim=64, hidden=32, bottleneck=16, local_crops=2, local_size=16)


def fmnist_scenes(c):
  common.vit_fmnist_scenes_overrides(c)
  _small(c, out_dim=1024, hidden=256, bottleneck=64, local_crops=4, local_size=48)
  c.optim.lr = 4e-3
  c.optim.warmup_epochs = 0.3
  c.optim.freeze_early_epochs = 0.3


def get_config(arg=None):
  c = common.base_config()
  c.model = common.vit_model("vit_s16")
  c.batch_size = 1024
  c.total_epochs = 100.0
  c.augment.presets = dino_presets()
  c.method = ml_collections.ConfigDict(dict(
      name="dino", module="", out_dim=65536, hidden=2048, bottleneck=256, norm_last_layer=True,
      local_crops=10, local_size=96, global_scale=(0.4, 1.0), local_scale=(0.05, 0.4),
      teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=30,
      student_temp=0.1, center_momentum=0.9, momentum=0.996, momentum_schedule="cosine",
      bn="sync", bn_groups=1, dilemma=common.dilemma_block()))
  c.optim.update(dict(name="adamw", lr=5e-4, base_batch_size=256, weight_decay=0.04,
                      weight_decay_end=0.4, warmup_epochs=10.0, clip_grad_norm=3.0,
                      clip_grad_per_tensor=True, no_decay=(r"bias$", r"scale$"),
                      freeze_early=("head/last_layer",), freeze_early_epochs=1.0))
  return common.apply_variant(c, arg, {"default": None, "dilemma": common.dilemma_on,
                                       "demo": demo, "test": test,
                                       "fmnist_scenes": fmnist_scenes})
