"""What the random-init floor of the garment k-NN owes to BatchNorm: running vs batch statistics.

    python benchmarks/bn_floor.py [--runs=random,runs/reproduce/mocov2_seed0] [--num_train=2000]

For each backbone (`random` = a randomly initialised ResNet-18, else a training run's workdir,
its latest checkpoint), the k-NN probe of dense_ssl/evaluate (weighted 20-NN on pooled C5
features of held-out single garments at 96 px) twice: with BatchNorm's running statistics, as
the evaluator runs it, and with every batch of 100 probe images normalised by its own
statistics. A random init's running statistics are their initial 0 / 1, so the first reading
is of an un-normalised random network and the second of a normalised one.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np
from absl import app, flags

from benchmarks import common
from dense_ssl import checkpoint, models
from dense_ssl.data import augment, scenes
from dense_ssl.evaluate import classification, features

BATCH = 100


def backbone_and_variables(run: str, model: str, seed: int
                           ) -> tuple[models.Backbone, dict[str, Any]]:
  if run == "random":
    backbone = models.Backbone(name=model, module=models.get_backbone(model))
    return backbone, features.init_variables(backbone, seed=seed, image_size=96)
  _, backbone, variables = checkpoint.load_backbone(run)
  return backbone, variables


@functools.partial(jax.jit, static_argnames=("backbone", "batch_statistics"))
def pooled(variables: Any, images: jax.Array, *, backbone: models.Backbone,
           batch_statistics: bool) -> jax.Array:
  module = backbone.eval_module()
  x = augment.normalize(images, features.IMAGENET)
  if batch_statistics:
    c5, _ = module.apply(variables, x, train=True, mutable=["batch_stats"])
  else:
    c5 = module.apply(variables, x, train=False)
  return c5.mean((1, 2))


def knn_top1(variables: Any, backbone: models.Backbone, data: tuple[np.ndarray, ...],
             batch_statistics: bool) -> float:
  train_x, train_y, test_x, test_y = data
  embed = lambda images: np.concatenate([
      np.asarray(pooled(variables, images[i:i + BATCH], backbone=backbone,
                        batch_statistics=batch_statistics))
      for i in range(0, len(images), BATCH)])
  pred = classification.knn_predict(embed(train_x), train_y, embed(test_x),
                                    num_classes=scenes.NUM_CLASSES)
  return float(np.mean(pred == test_y))


def main(argv):
  del argv
  f = flags.FLAGS
  data = (*scenes.single_garments("probe_train", size=96, n=f.num_train),
          *scenes.single_garments("probe_test", size=96, n=f.num_test))
  print(common.machine_header(jax.devices()))
  rows = []
  for run in f.runs:
    backbone, variables = backbone_and_variables(run, f.model, f.seed)
    rows.append({"backbone": run,
                 "k-NN, running BN": f"{knn_top1(variables, backbone, data, False):.1%}",
                 "k-NN, batch BN": f"{knn_top1(variables, backbone, data, True):.1%}"})
    print(rows[-1], flush=True)
  print(common.table(rows, ["backbone", "k-NN, running BN", "k-NN, batch BN"]))


if __name__ == "__main__":
  flags.DEFINE_list("runs", ["random"], "`random` or training workdirs (latest checkpoint).")
  flags.DEFINE_string("model", "resnet18", "config.model.name of `random`.")
  flags.DEFINE_integer("seed", 0, "Seed of `random`.")
  flags.DEFINE_integer("num_train", 2000, "Held-out garments the k-NN is fitted on.")
  flags.DEFINE_integer("num_test", 1000, "Held-out garments it is scored on.")
  app.run(main)
