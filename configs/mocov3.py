"""MoCo v3 (Chen, Xie & He, ICCV 2021) on ViTs, with DILEMMA (Sameni et al., 2022) as an option.

    python -m dense_ssl.main --config=configs/mocov3.py --workdir=runs/mocov3             # recipe
    python -m dense_ssl.main --config=configs/mocov3.py:dilemma --workdir=runs/dilemma    # + DILEMMA
    python -m dense_ssl.main --config=configs/mocov3.py:demo,dilemma --workdir=runs/demo  # CPU

Default = the ViT-S/16 recipe of DILEMMA's MoCo v3 host (REFERENCES.md; the official
moco-v3 README's ViT-S command at batch 1024): ViT-S/16 with MoCo v3's fixed 2-D sin-cos
positions and frozen patch embedding (`--stop-grad-conv1`), 224 px views (crop scale 0.08-1),
BYOL's asymmetric augmentation (view1: blur p=1; view2: blur p=0.1, solarize p=0.2; jitter
0.4/0.4/0.2/0.1 p=0.8, grey p=0.2), projector 3 x 4096 -> 256 and predictor 2 x 4096 -> 256
with BatchNorm (SyncBN, as the official DDP runs), T = 0.2, momentum 0.99 -> 1 (cosine), batch
1024, AdamW lr 1.5e-4 x batch/256, wd 0.1 on every parameter, 300 epochs, 40 warm-up, cosine.

Variants (comma-separated, in order): `dilemma` (config.method.dilemma.enabled: drop 0.75 of the
student's patch tokens, p = 0.2 wrong positions, λ = 1), `demo` (embedded photos, ViT-micro/8
at 64 px), `test` (tiny), `fmnist_scenes` (the reproduction benchmark's protocol, ViT-micro/8 at
96 px). DILEMMA's released code uses a learned position table (timm's); this config keeps MoCo
v3's sin-cos one, `--config.model.pos_embed=learned` (and dropping it from optim.frozen) is
DILEMMA's.
"""

import ml_collections

from configs import common


def mocov3_presets() -> dict:
  """BYOL's augmentation as MoCo v3 has it (`augmentation1`, `augmentation2`)."""
  jitter = dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
  return dict(mocov3_view1=common.preset(**jitter, blur_prob=1.0),
              mocov3_view2=common.preset(**jitter, blur_prob=0.1, solarize_prob=0.2))


def get_config(arg=None):
  c = common.base_config()
  c.model = common.vit_model("vit_s16", pos_embed="sincos")
  c.batch_size = 1024
  c.total_epochs = 300.0
  c.data.crop_scale = (0.08, 1.0)
  c.augment.presets = mocov3_presets()
  c.method = ml_collections.ConfigDict(dict(
      name="mocov3", module="", temperature=0.2, momentum=0.99, momentum_schedule="cosine",
      dim=256, hidden=4096, bn="sync", bn_groups=1, dilemma=common.dilemma_block()))
  c.optim.update(dict(name="adamw", lr=1.5e-4, base_batch_size=256, weight_decay=0.1,
                      warmup_epochs=40.0, frozen=("backbone/patch_embed", "backbone/pos_embed")))
  return common.apply_variant(c, arg, {"default": None, "dilemma": common.dilemma_on,
                                       # x 32/256 = 5e-4: a tiny ViT in 300 steps
                                       **common.vit_head_variants(4e-3, demo_warmup=0.5,
                                                                scenes_warmup=0.3)})
