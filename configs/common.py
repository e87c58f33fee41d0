"""Building blocks shared by the method configs: the base config and variant handling.

Configs hold values only. A method config starts from `base_config()`, sets `config.method`, then
applies the variant's overrides; `locked()` makes a misspelt key (in a file or on the command line
as `--config.optim.lr=...`) an error.
"""

import ml_collections

IMAGENET = dict(source="imagenet2012", data_dir="", folder="", split="train")


def preset(**overrides) -> dict:
  """A colour-augmentation preset: MoCo-v2's (torchvision ColorJitter(0.4, 0.4, 0.4, 0.1) with
  p 0.8, grey p 0.2, Gaussian blur sigma 0.1-2 with p 0.5, no solarisation), with overrides."""
  p = dict(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, jitter_prob=0.8,
           grey_prob=0.2, blur_prob=0.5, blur_sigma=(0.1, 2.0), solarize_prob=0.0)
  unknown = sorted(set(overrides) - set(p))
  if unknown:
    raise ValueError(f"Unknown augmentation preset keys {unknown}; valid: {sorted(p)}.")
  p.update(overrides)
  return p


def base_config() -> ml_collections.ConfigDict:
  """The MoCo-v2 ImageNet recipe's shared parts (ResNet-50, 200 epochs, batch 256)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 256
  # Durations: exactly one of total_epochs / total_steps is > 0 (resolved in train.py).
  c.total_epochs = 200.0
  c.total_steps = 0

  c.model = ml_collections.ConfigDict(dict(name="resnet50", zero_init_residual=False,
                                           half_precision=False))
  c.data = ml_collections.ConfigDict(dict(
      **IMAGENET, image_size=224, crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3), flip=True,
      shuffle_buffer=10_000, demo_num_images=1024, prefetch=2, scenes_num_images=10_000,
      scenes_size=96, scenes_background_pool=0, scenes_tint=True, folder_decoder="tf"))
  # Colour augmentation presets by name; each view of a method names one (its ViewSpec).
  c.augment = ml_collections.ConfigDict(dict(
      mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
      presets=dict(mocov2=preset())))
  # Optimiser and its hooks (dense_ssl/optim.py): regexes of parameter paths for no_decay,
  # frozen and freeze_early; weight_decay_end >= 0 makes the decay a cosine schedule;
  # base_batch_size > 0 scales lr by batch_size / base_batch_size.
  c.optim = ml_collections.ConfigDict(dict(
      name="sgd", lr=0.03, momentum=0.9, weight_decay=1e-4, schedule="cosine",
      warmup_epochs=0.0, b1=0.9, b2=0.999, base_batch_size=0, weight_decay_end=-1.0,
      clip_grad_norm=0.0, clip_grad_per_tensor=False, no_decay=(), frozen=(), freeze_early=(),
      freeze_early_epochs=0.0))

  # Frozen-backbone evaluators (dense_ssl/evaluate), by name: {"type": registered name, params}.
  # They run on process 0 every `eval_every_steps` (0 = once, at the end; otherwise also at
  # step 0, the initialisation's baseline) when any are set.
  c.evals = ml_collections.ConfigDict()
  c.eval_every_steps = 0

  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.nan_policy = "stop"  # stop | skip_step
  return c


def moco_method(**overrides) -> ml_collections.ConfigDict:
  """MoCo-v2's method block; DenseCL/HoughCL add their own keys through `overrides`."""
  m = dict(name="mocov2", module="", temperature=0.2, queue_size=65536, momentum=0.999,
           momentum_schedule="constant", dim=128, hidden=2048, bn="shuffle", bn_groups=8)
  m.update(overrides)
  return ml_collections.ConfigDict(m)


def method_sizes(c: ml_collections.ConfigDict, **sizes) -> None:
  """Sets the method's size keys that it has (BYOL has no queue): a table lookup by key."""
  c.method.update({k: v for k, v in sizes.items() if k in c.method})


def demo_overrides(c: ml_collections.ConfigDict) -> None:
  """Embedded photos, ResNet-18 at 128 px, a few minutes on 2 CPU cores."""
  c.model.name = "resnet18"
  c.data.update(dict(source="demo", image_size=128, demo_num_images=2048))
  c.batch_size = 32
  c.total_epochs = 0.0
  c.total_steps = 300
  c.optim.lr = 0.03
  method_sizes(c, queue_size=1024, hidden=512, bn_groups=4)
  c.log_every_steps = 10
  c.checkpoint_every_steps = 100


def test_overrides(c: ml_collections.ConfigDict) -> None:
  """Tiny: seconds per step on one CPU, 8 fake devices allowed."""
  c.model.name = "resnet18"
  c.data.update(dict(source="demo", image_size=64, demo_num_images=64))
  c.batch_size = 16
  c.total_epochs = 0.0
  c.total_steps = 4
  method_sizes(c, queue_size=64, hidden=64, dim=16, bn_groups=8)
  c.log_every_steps = 2
  c.checkpoint_every_steps = 2


def fmnist_scenes_overrides(c: ml_collections.ConfigDict) -> None:
  """Fashion-MNIST scenes (benchmarks/reproduce.py): ResNet-18 at width 16, the protocol's
  2000 steps (6.4 epochs of the 10k scenes).

  Views at the scenes' own 96 px (a 3x3 grid of 32 px cells, about one garment each): upsampled
  crops would add compute and no information. A quarter of torchvision's width (C5 of 128
  channels) trains ~5x faster on 2 CPU cores (160 vs 32 img/s for MoCo-v2), which buys the
  budget in which pretraining shows (benchmarks/RESULTS.md §4f).
  """
  fmnist_scenes_protocol(c)
  c.model.name = "resnet18"
  c.model.width = 16
  # The dense probe reads scenes at 192 px, where C4 is a 12x12 grid like a ViT/8's at 96 px.
  # At 96 px (C4 6x6, C5 3x3) it labelled nearly every pixel background for every backbone,
  # random or pretrained, and could not tell them apart (RESULTS.md §4h).
  c.evals.dense.image_size = 192
  method_sizes(c, queue_size=2048, hidden=512, bn_groups=4)


def sgd_fmnist_scenes_overrides(c: ml_collections.ConfigDict) -> None:
  """`fmnist_scenes_overrides` for the SGD methods (MoCo-v2, DenseCL, HoughCL): lr 0.05 and
  key momentum 0.99 for a run of a few thousand steps.

  lr 0.3 (best at 100 steps, §4c) lets the garment probes fall back over 2000 steps; 0.05
  keeps them above random init (§4f). A key encoder at 0.999 would still be a third its
  initial weights after 1000 steps; 0.99 is MoCo's setting for short CIFAR-size runs.
  """
  fmnist_scenes_overrides(c)
  c.optim.lr = 0.05
  c.method.momentum = 0.99


# The benchmark's scenes (benchmarks/RESULTS.md §4f): grey garments on backgrounds drawn from
# one fixed pool of SCENES_POOL, for pretraining and probes alike. A background of its own and
# a random garment colour per scene are cues that tell two pretraining scenes apart and say
# nothing of a garment's class, and instance discrimination learnt them instead of garments.
SCENES_POOL = 8


def scenes_style(c: ml_collections.ConfigDict) -> dict:
  """The evaluators' scene keywords: the probes draw the pretraining scenes' backgrounds and
  garment colours (`config.data.scenes_background_pool`, `scenes_tint`)."""
  return dict(background_pool=c.data.scenes_background_pool, tint=c.data.scenes_tint)


def fmnist_scenes_protocol(c: ml_collections.ConfigDict) -> None:
  """What every method's `fmnist_scenes` variant shares: data, batch, steps and evaluators."""
  c.data.update(dict(source="fmnist_scenes", image_size=96, scenes_background_pool=SCENES_POOL,
                     scenes_tint=False))
  c.batch_size = 32
  c.total_epochs = 0.0
  c.total_steps = 2000
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  # The protocol of benchmarks/reproduce.py, also logged at the end of a run. 5000 held-out
  # garments put the sampling error of an accuracy near 0.7 pt; evaluating one backbone takes
  # about a minute on 2 CPU cores. Garments at 96 px: XLA:CPU runs a ResNet-18 forward at 64 px
  # 4.6x slower than at 96 px (3.17 s vs 0.69 s per 64 images).
  style = scenes_style(c)
  c.evals = ml_collections.ConfigDict(dict(
      linear=dict(type="linear", num_train=5000, num_test=5000, image_size=96, **style),
      knn=dict(type="knn", num_train=5000, num_test=5000, image_size=96, **style),
      dense=dict(type="dense", num_train=500, num_test=250, image_size=96, steps=300, **style),
      corr=dict(type="correspondence", num_pairs=128, **style)))


def apply_variant(c: ml_collections.ConfigDict, arg: str | None,
                  variants: dict) -> ml_collections.ConfigDict:
  """Applies the named variant (None/'' = the paper's recipe) and locks the config.

  `arg` may name several, comma-separated, applied in order: `demo,dilemma` is the demo with
  the DILEMMA option on (configs of the ViT methods).
  """
  for name in (arg or "default").split(","):
    name = name.strip() or "default"
    if name not in variants:
      raise ValueError(f"Unknown config variant {name!r}; valid variants: "
                       f"{', '.join(sorted(variants))}.")
    if variants[name] is not None:
      variants[name](c)
  c.lock()
  return c


# ---------------------------------------------------------------------------------------------
# ViT methods (MoCo v3, DINO, SimCLR) and their DILEMMA option.
# ---------------------------------------------------------------------------------------------


def vit_model(name: str = "vit_s16", pos_embed: str = "learned") -> ml_collections.ConfigDict:
  """config.model of a ViT: its name, learned or sin-cos positions, bfloat16 compute."""
  return ml_collections.ConfigDict(dict(name=name, half_precision=False, pos_embed=pos_embed))


def dilemma_block() -> ml_collections.ConfigDict:
  """config.method.dilemma (methods/dilemma.py), off; the `dilemma` variant turns it on with
  the paper's values: drop 0.75 of the student's patch tokens, p = 0.2 wrong positions, λ = 1."""
  return ml_collections.ConfigDict(dict(enabled=False, drop_rate=0.75, probability=0.2,
                                        lam=1.0))


def dilemma_on(c: ml_collections.ConfigDict) -> None:
  c.method.dilemma.enabled = True


def vit_demo_overrides(c: ml_collections.ConfigDict) -> None:
  """Embedded photos, ViT-micro/8 at 64 px (64 patch tokens), minutes on 2 CPU cores."""
  c.model.name = "vit_micro8"
  c.data.update(dict(source="demo", image_size=64, demo_num_images=2048))
  c.batch_size = 32
  c.total_epochs = 0.0
  c.total_steps = 300
  c.optim.warmup_epochs = 0.0
  c.log_every_steps = 10
  c.checkpoint_every_steps = 100


def vit_test_overrides(c: ml_collections.ConfigDict) -> None:
  """Tiny: ViT-micro/8 at 32 px (16 patch tokens, 4 kept with DILEMMA), 8 fake devices."""
  c.model.name = "vit_micro8"
  c.data.update(dict(source="demo", image_size=32, demo_num_images=64))
  c.batch_size = 16
  c.total_epochs = 0.0
  c.total_steps = 4
  c.optim.warmup_epochs = 0.0
  c.log_every_steps = 2
  c.checkpoint_every_steps = 2


def vit_fmnist_scenes_overrides(c: ml_collections.ConfigDict) -> None:
  """The scenes' protocol (`fmnist_scenes_protocol`) with ViT-micro/8 at 96 px: 12 x 12
  tokens, 4 x 4 per 32 px garment cell, for 500 steps: MoCo v3's probes stop moving after
  250 (benchmarks/RESULTS.md §4f), and a step costs about three of the width-16 ResNet's."""
  fmnist_scenes_protocol(c)
  c.model.name = "vit_micro8"
  c.total_steps = 500
  c.optim.warmup_epochs = 0.0


def vit_head_variants(lr: float | None = None, demo_warmup: float = 0.0,
                      scenes_warmup: float = 0.0) -> dict:
  """`demo`, `test` and `fmnist_scenes` of a ViT method with a projection head
  (`method.hidden`, `method.dim`): 512/64 on ViT-micro/8 (32/16 in `test`), `lr` (None = the
  recipe's) and warm-up epochs for the two small runs."""

  def small(overrides, warmup):
    def variant(c):
      overrides(c)
      c.method.hidden, c.method.dim = 512, 64
      if lr is not None:
        c.optim.lr = lr
      c.optim.warmup_epochs = warmup
    return variant

  def test(c):
    vit_test_overrides(c)
    c.method.hidden, c.method.dim = 32, 16

  return {"demo": small(vit_demo_overrides, demo_warmup), "test": test,
          "fmnist_scenes": small(vit_fmnist_scenes_overrides, scenes_warmup)}