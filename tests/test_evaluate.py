"""Evaluators on real Fashion-MNIST scenes with ResNet-18 at 64-128 px, and their exact maths.

Training a backbone self-supervised is far too slow for a unit test, so each evaluator is shown
to separate an *informative* backbone from a randomly initialised one, with two honest
references built in seconds to minutes:

* `supervised`: ResNet-18 fitted for 30 steps (batch 32, Adam 1e-3) to classify the garments of
  the probes' own training split ("probe_train" single garments at 64 px), i.e. a short
  supervised fit; its BatchNorm running statistics come from those steps. It is the reference
  for the linear, k-NN and dense probes.
* `colour_edge`: no training; the stem is fixed colour (Gaussian, both signs) and oriented
  derivative-of-Gaussian edge filters, every residual branch a per-channel box blur and every
  projection shortcut a channel-preserving subsampling, so a C5 cell describes the colours and
  edges of its neighbourhood. It is the reference for correspondence: the short supervised fit
  makes C5 *more* invariant to position and *lowers* matching accuracy (measured: 0.60 vs 0.69
  for random weights), which is why dense methods exist.

Exact answers on hand-made inputs check mIoU, the confusion matrix, weighted k-NN voting and the
linear fit. The command line runs on a checkpoint written with orbax.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from dense_ssl import checkpoint, config_errors, evaluate, models
from dense_ssl.data import scenes
from dense_ssl.evaluate import classification, correspondence, dense, features

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "resnet18"
BACKBONE = models.Backbone(MODEL, models.get_backbone(MODEL))


# ---------------------------------------------------------------------------------------------
# Reference backbones.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_init():
  return features.init_variables(BACKBONE, seed=0)


@pytest.fixture(scope="module")
def supervised(random_init):
  """30 Adam steps of garment classification on "probe_train" (see the module docstring)."""
  images, labels = scenes.single_garments("probe_train", size=64, n=512)
  model = models.get_backbone(MODEL)
  norm = features.IMAGENET
  tx = optax.adam(1e-3)

  def loss_fn(params, stats, x, y):
    x = (x.astype(jnp.float32) / 255.0 - jnp.asarray(norm.mean)) / jnp.asarray(norm.std)
    c5, updates = model.apply({"params": params["backbone"], "batch_stats": stats}, x,
                              train=True, mutable=["batch_stats"])
    logits = jnp.mean(c5, axis=(1, 2)) @ params["head"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, updates["batch_stats"]

  @jax.jit
  def step(params, stats, opt_state, x, y):
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  params = {"backbone": random_init["params"], "head": jnp.zeros((512, scenes.NUM_CLASSES))}
  stats, opt_state = random_init["batch_stats"], tx.init(params)
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(30):
    idx = rng.integers(0, len(images), 32)
    params, stats, opt_state, loss = step(params, stats, opt_state, images[idx], labels[idx])
    losses.append(float(loss))
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3  # the fit did learn something
  return {"params": params["backbone"], "batch_stats": stats}


@pytest.fixture(scope="module")
def colour_edge(random_init):
  """Fixed colour/edge stem, box-blur residual branches (see the module docstring)."""
  variables = jax.tree.map(np.array, random_init)
  params = variables["params"]
  r = np.arange(-3, 4, dtype=np.float32)
  gauss = np.exp(-r**2 / (2 * 1.5**2))
  gauss /= gauss.sum()
  deriv = -r / 1.5**2 * gauss
  dx, dy = np.outer(gauss, deriv), np.outer(deriv, gauss)
  stem = np.zeros((7, 7, 3, 64), np.float32)
  for c in range(3):  # Both signs, so the ReLU after the stem keeps the colour.
    stem[:, :, c, c], stem[:, :, c, 3 + c] = np.outer(gauss, gauss), -np.outer(gauss, gauss)
  for j, edge in enumerate((dx, dy, (dx + dy) / np.sqrt(2), (dx - dy) / np.sqrt(2))):
    stem[:, :, :, 6 + 2 * j], stem[:, :, :, 7 + 2 * j] = edge[..., None] / 3, -edge[..., None] / 3
  params["conv1"]["kernel"] = stem
  for name, block in params.items():
    for conv in block.values() if name.startswith("layer") else ():
      if "kernel" in conv:
        kh, kw, cin, cout = conv["kernel"].shape
        kernel = np.zeros_like(conv["kernel"])
        kernel[:, :, np.arange(min(cin, cout)), np.arange(min(cin, cout))] = 1.0 / (kh * kw)
        conv["kernel"] = kernel
  return variables


# ---------------------------------------------------------------------------------------------
# Features.
# ---------------------------------------------------------------------------------------------


def test_features_are_the_backbone_in_eval_mode(random_init):
  images = scenes.make_scenes(5, seed=0, split="probe_test", size=64)["images"]
  out = features.extract(BACKBONE, random_init, images, batch_size=2, with_c4=True)
  assert out["map"].shape == (5, 2, 2, 512) and out["c4"].shape == (5, 4, 4, 256)
  norm = features.IMAGENET
  x = (images / 255.0 - np.asarray(norm.mean)) / np.asarray(norm.std)
  c5 = models.get_backbone(MODEL).apply(random_init, jnp.asarray(x, jnp.float32), train=False)
  np.testing.assert_allclose(out["map"], c5, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out["pooled"], np.mean(c5, axis=(1, 2)), rtol=1e-4, atol=1e-4)
  # Padding the last batch changes nothing; C5 alone is the same computation.
  alone = features.extract(BACKBONE, random_init, images, batch_size=8)
  np.testing.assert_allclose(alone["map"], out["map"], rtol=1e-5, atol=1e-5)
  assert "c4" not in alone


def test_vit_features_are_the_class_token_or_mean_patch_and_the_patch_grid():
  vit = models.Backbone("vit_micro8", models.get_backbone("vit_micro8"))
  variables = features.init_variables(vit, seed=0, image_size=32)
  images = scenes.make_scenes(3, seed=0, split="probe_test", size=32)["images"]
  out = features.extract(vit, variables, images, batch_size=2)
  norm = features.IMAGENET
  x = (images / 255.0 - np.asarray(norm.mean)) / np.asarray(norm.std)
  tokens = vit.module.apply(variables, jnp.asarray(x, jnp.float32), train=False)
  np.testing.assert_allclose(out["pooled"], tokens[:, 0], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out["map"], np.asarray(tokens[:, 1:]).reshape(3, 4, 4, 64),
                             rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="C4 is a ResNet's stride-16 map"):
    features.extract(vit, variables, images, with_c4=True)
  # ConMIM's (BEiT's) probe protocol: the same weights, the mean patch token.
  mean_pooled = models.Backbone("vit_micro8", vit.module, pool="mean")
  out = features.extract(mean_pooled, variables, images, batch_size=2)
  np.testing.assert_allclose(out["pooled"], np.mean(tokens[:, 1:], axis=1), rtol=1e-4,
                             atol=1e-4)
  with pytest.raises(ValueError, match="a ResNet has no class token"):
    models.Backbone(MODEL, BACKBONE.module, pool="cls")


def test_reestimated_batch_stats_make_eval_mode_normalise_like_batch_mode(random_init):
  """The floor of benchmarks/reproduce.py's BatchNorm networks (PreciseBN). Estimated on the
  very batch, eval mode is that batch's train-mode forward; estimated on pretraining scenes,
  eval mode on held-out scenes is much nearer to it than a random init's 0 / 1 statistics
  (measured 0.33 vs 0.86 relative distance at C5). Weights stay as they were."""
  pretrain = scenes.make_scenes(256, seed=0, split="pretrain", size=64)["images"]
  held_out = scenes.make_scenes(32, seed=0, split="probe_test", size=64)["images"]
  redone = features.reestimate_batch_stats(BACKBONE, random_init, pretrain, batch_size=16)
  assert jax.tree.all(jax.tree.map(np.array_equal, redone["params"], random_init["params"]))
  norm = features.IMAGENET
  x = jnp.asarray((held_out / 255.0 - np.asarray(norm.mean)) / np.asarray(norm.std),
                  jnp.float32)
  model = models.get_backbone(MODEL)
  batch_mode, _ = model.apply(random_init, x, train=True, mutable=["batch_stats"])

  def distance(variables):
    c5 = model.apply(variables, x, train=False)
    return float(jnp.linalg.norm(c5 - batch_mode) / jnp.linalg.norm(batch_mode))

  assert distance(redone) < 0.5 < 0.7 < distance(random_init)
  itself = features.reestimate_batch_stats(BACKBONE, random_init, held_out, batch_size=32)
  assert distance(itself) < 1e-4
  vit = models.Backbone("vit_micro8", models.get_backbone("vit_micro8"))
  vit_variables = features.init_variables(vit, seed=0, image_size=32)
  assert features.reestimate_batch_stats(vit, vit_variables, held_out) is vit_variables


def test_every_evaluator_runs_on_a_vit():
  """The fmnist_scenes protocol's four evaluators on ViT-micro/8 (table initialised at 32 px and
  interpolated to the evaluators' sizes): the linear probe and k-NN read the class token, the
  dense probe and correspondence the patch tokens on their grid (stride = the patch)."""
  vit = models.Backbone("vit_micro8", models.get_backbone("vit_micro8"))
  variables = features.init_variables(vit, seed=0, image_size=32)
  evals = evaluate.from_config({
      "linear": {"type": "linear", "num_train": 60, "num_test": 40, "image_size": 32,
                 "steps": 50},
      "knn": {"type": "knn", "num_train": 60, "num_test": 40, "image_size": 32},
      "dense": {"type": "dense", "num_train": 16, "num_test": 8, "steps": 20},
      "corr": {"type": "correspondence", "num_pairs": 8, "scene_size": 64, "image_size": 64}},
      vit)
  results = evaluate.run_all(evals, variables)
  assert 0.0 <= results["linear/top1"] <= 1.0 and 0.0 <= results["knn/top1"] <= 1.0
  assert 0.0 <= results["dense/miou"] <= 1.0
  assert 0.0 <= results["corr/argmax_acc_exact"] <= results["corr/argmax_acc"] <= 1.0
  assert 0.0 < results["corr/chance_acc"] < 1.0
  # Matching patch tokens beats chance even untrained (8 x 8 grids of 8 px patches).
  assert results["corr/argmax_acc"] > results["corr/chance_acc"]


# ---------------------------------------------------------------------------------------------
# Exact answers.
# ---------------------------------------------------------------------------------------------


def test_miou_exact_answers():
  gt = np.array([[0, 0, 1, 1], [2, 2, 2, 0]])
  perfect = dense.confusion_matrix(gt, gt, 11)
  assert dense.iou_from_confusion(perfect)[0] == 1.0
  pred = np.array([[0, 1, 1, 1], [2, 2, 0, 0]])
  confusion = dense.confusion_matrix(pred, gt, 11)
  assert confusion[0, 1] == 1 and confusion[2, 0] == 1 and confusion.sum() == 8
  miou, iou = dense.iou_from_confusion(confusion)
  # class 0: TP 2, FP 1, FN 1 -> 1/2; class 1: TP 2, FP 1 -> 2/3; class 2: TP 2, FN 1 -> 2/3.
  np.testing.assert_allclose(iou[:3], [0.5, 2 / 3, 2 / 3])
  assert np.all(np.isnan(iou[3:]))  # absent classes do not count as 0
  assert miou == pytest.approx((0.5 + 2 / 3 + 2 / 3) / 3)
  assert dense.iou_from_confusion(dense.confusion_matrix(1 - gt.clip(0, 1), gt.clip(0, 1),
                                                         2))[0] == 0.0


def test_knn_exact_answers():
  # One very similar neighbour of class 1 against two fairly similar ones of class 0.
  train = np.array([[0.99, np.sqrt(1 - 0.99**2)], [0.9, np.sqrt(1 - 0.81)],
                    [0.9, -np.sqrt(1 - 0.81)], [-1.0, 0.0]])
  labels = np.array([1, 0, 0, 2])
  query = np.array([[1.0, 0.0]])
  # T = 0.07: exp(0.99/T) > 2 exp(0.9/T) (ratio e^1.29 = 3.6) -> class 1.
  assert classification.knn_predict(train, labels, query, num_classes=3, k=3)[0] == 1
  # T = 1: exp(0.99) = 2.69 < 2 exp(0.9) = 4.92 -> the majority, class 0.
  assert classification.knn_predict(train, labels, query, num_classes=3, k=3,
                                    temperature=1.0)[0] == 0
  # k = 1 is the nearest neighbour; cosine ignores the features' scale.
  assert classification.knn_predict(7 * train, labels, 0.1 * query, num_classes=3, k=1)[0] == 1
  assert classification.knn_predict(train, labels, -query, num_classes=3, k=1)[0] == 2


def test_linear_fit_separates_separable_features():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(4, 16)) * 3
  y = rng.integers(0, 4, 200)
  x = centres[y] + rng.normal(size=(200, 16)) * 0.3
  x, = classification.standardize(x)
  params = classification.fit_linear(x, y, num_classes=4, steps=100, lr=0.1, weight_decay=0.0)
  np.testing.assert_array_equal(np.argmax(x @ params["w"] + params["b"], -1), y)


# ---------------------------------------------------------------------------------------------
# Registry and configs.
# ---------------------------------------------------------------------------------------------


def test_registry_builds_evaluators_from_duck_typed_configs():
  assert evaluate.names() == ["correspondence", "dense", "finetune", "knn", "linear"]

  class Duck:  # ml_collections-like: has to_dict()
    def __init__(self, d):
      self.d = d

    def to_dict(self):
      return dict(self.d)

  built = evaluate.from_config(Duck({"lin": {"type": "linear", "num_train": 10},
                                     "knn": {"k": 5}}), BACKBONE)
  assert isinstance(built["lin"], classification.LinearProbe) and built["lin"].num_train == 10
  assert isinstance(built["knn"], classification.KNN) and built["knn"].k == 5
  assert list(evaluate.from_config(evaluate.DEFAULT_EVALS, BACKBONE, only=["corr"])) == ["corr"]
  with pytest.raises(ValueError, match="valid choices: correspondence, dense, finetune, knn, linear"):
    evaluate.from_config({"x": {"type": "segmentation"}}, BACKBONE)
  with pytest.raises(ValueError, match="no parameter.*num_trian.*valid: num_train"):
    evaluate.from_config({"linear": {"num_trian": 5}}, BACKBONE)
  with pytest.raises(ValueError, match="No evaluator named dense.*configured: knn"):
    evaluate.from_config({"knn": {}}, BACKBONE, only=["dense"])
  with pytest.raises(ValueError, match="Unknown matcher"):
    evaluate.create("correspondence", BACKBONE, matchers=["sinkhorn"])


def test_every_scene_evaluator_draws_the_configured_scene_style(monkeypatch):
  """background_pool / tint reach the held-out data of each evaluator (the probes must see
  the pretraining scenes' style, configs/common.py: fmnist_scenes_protocol)."""
  style = dict(background_pool=2, tint=False)
  pool = {scenes._to_uint8(b)[:2, :2].tobytes() for b in scenes.shared_backgrounds(2, 32)}
  vit = models.Backbone("vit_micro8", models.get_backbone("vit_micro8"))
  kw = dict(num_train=6, num_test=4, image_size=32, **style)
  garments = [evaluate.create("linear", BACKBONE, **kw).data()[0],
              evaluate.create("knn", BACKBONE, **kw).data()[2],
              evaluate.create("finetune", vit, **kw)._data()[0]]
  dense_scenes = evaluate.create("dense", BACKBONE, **kw).data()[1]["images"]
  for images in [*garments, dense_scenes]:
    assert any(im[:2, :2].tobytes() in pool for im in images)  # a pool background's corner
  for images in garments:  # grey garments: R = G = B in the middle of the canvas
    assert np.median(np.ptp(images[:, 12:20, 12:20].astype(np.int32), axis=-1)) <= 1
  # The correspondence pairs are crops of scenes: what matters is what was asked for.
  asked = []
  make_scenes = scenes.make_scenes
  monkeypatch.setattr(scenes, "make_scenes",
                      lambda *a, **k: asked.append(k) or make_scenes(*a, **k))
  evaluate.create("correspondence", BACKBONE, num_pairs=3, scene_size=32, image_size=64,
                  **style).pairs()
  assert [(k["background_pool"], k["tint"]) for k in asked] == [(2, False)]


# ---------------------------------------------------------------------------------------------
# Informative beats random, per evaluator.
# ---------------------------------------------------------------------------------------------


def test_linear_and_knn_probes_prefer_the_supervised_backbone(random_init, supervised):
  kw = dict(num_train=200, num_test=150, image_size=64)
  linear = evaluate.create("linear", BACKBONE, steps=200, **kw)
  knn = evaluate.create("knn", BACKBONE, **kw)
  scores = {name: {ref: dict(ev.run(v))["top1"]
                   for ref, v in (("random", random_init), ("supervised", supervised))}
            for name, ev in (("linear", linear), ("knn", knn))}
  for name, s in scores.items():
    assert 0.0 <= s["random"] <= 1.0
    assert s["supervised"] > s["random"] + 0.05, (name, s)


def test_dense_probe_prefers_the_supervised_backbone(random_init, supervised):
  probe = dense.DenseProbe(BACKBONE, num_train=128, num_test=128, image_size=96, steps=200)
  random_result = probe.evaluate(random_init)
  result = probe.evaluate(supervised)
  assert result.miou > random_result.miou, (result.miou, random_result.miou)
  # The reported numbers are those of the returned predictions.
  assert result.predictions.shape == result.label_maps.shape == (128, 96, 96)
  confusion = dense.confusion_matrix(result.predictions, result.label_maps, 11)
  assert result.miou == pytest.approx(dense.iou_from_confusion(confusion)[0])
  assert result.pixel_acc == pytest.approx(np.mean(result.predictions == result.label_maps))
  assert dict(probe.run(supervised)) == {"miou": result.miou, "miou_se": result.miou_se,
                                         "pixel_acc": result.pixel_acc}
  # Its sampling error is that of 128 scenes: positive, and about sqrt(2) larger on half of
  # them (the bootstrap of the mIoU over scenes).
  assert 0.0 < result.miou_se < 0.1
  half = dense.miou_standard_error(result.predictions[:64], result.label_maps[:64], 11)
  assert 1.1 < half / result.miou_se < 1.9, (half, result.miou_se)
  perfect = dense.miou_standard_error(result.label_maps, result.label_maps, 11)
  assert perfect == 0.0


def test_correspondence_prefers_the_colour_edge_backbone(random_init, colour_edge):
  corr = correspondence.Correspondence(BACKBONE, num_pairs=64, scene_size=64, image_size=128)
  pairs = corr.pairs()
  assert pairs["view1"].shape == (64, 128, 128, 3) and pairs["view1_coords"].shape == (64, 4, 4, 2)
  rand, edge = dict(corr.run(random_init)), dict(corr.run(colour_edge))
  assert set(edge) == {f"{m}_{k}" for m in ("argmax", "hough", "hough_v1", "identity")
                       for k in ("acc", "acc_exact", "identity")} | {"chance_acc"}
  assert edge["identity_identity"] == 1.0
  assert rand["chance_acc"] == edge["chance_acc"] < rand["argmax_acc"]
  assert edge["argmax_acc"] > rand["argmax_acc"] + 0.05, (edge, rand)


# ---------------------------------------------------------------------------------------------
# Command line on a checkpoint.
# ---------------------------------------------------------------------------------------------


def test_command_line_evaluates_a_checkpoint(tmp_path, random_init):
  tree = {"step": np.int32(7),
          "params": {"backbone": random_init["params"], "neck": {}},
          "batch_stats": {"online": {"backbone": random_init["batch_stats"]}}}
  manager = checkpoint.create_manager(str(tmp_path), keep=1, every_steps=1)
  manager.save(7, args=ocp.args.StandardSave(jax.tree.map(np.asarray, tree)))
  manager.wait_until_finished()
  manager.close()
  config = config_errors.override(config_errors.load_config("configs/mocov2.py:test"), {
      "evals": {"knn": {"type": "knn", "num_train": 60, "num_test": 30, "image_size": 32}}})
  checkpoint.save_config(str(tmp_path), config)
  proc = subprocess.run([sys.executable, "-m", "dense_ssl.evaluate", f"--workdir={tmp_path}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "knn/top1" in proc.stdout and "step 7" in proc.stdout
  written = json.loads((tmp_path / "eval_7.json").read_text())
  assert written["step"] == 7 and 0.0 <= written["knn/top1"] <= 1.0
  assert written["z/secs/knn"] > 0
  bad = subprocess.run([sys.executable, "-m", "dense_ssl.evaluate", f"--workdir={tmp_path}",
                        "--evals=dense"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert bad.returncode == 1 and "No evaluator named dense" in bad.stderr
