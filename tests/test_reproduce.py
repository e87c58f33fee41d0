"""The pieces of benchmarks/reproduce.py (the full run is the lead's): table, file section,
evaluation of a backbone, and the dense-probe figure, on real fmnist scenes."""

import json
import re

import matplotlib.image
import numpy as np
import pytest

from benchmarks import reproduce
from dense_ssl import evaluate, models
from dense_ssl.data import scenes
from dense_ssl.evaluate import features


def test_markdown_table_formats_every_column():
  rows = [{"name": "random init", "seed": 0, "linear/top1": 0.2815, "knn/top1": 0.25,
           "dense/miou": 0.0951, "corr/argmax_acc": 0.6870, "corr/argmax_acc_exact": 0.25,
           "corr/hough_acc": 0.69, "corr/hough_acc_exact": 0.3, "corr/hough_identity": 0.32,
           "corr/hough_v1_acc": 0.49, "corr/identity_acc": 0.486},
          {"name": "densecl", "seed": 1, "linear/top1": 0.5, "wall_s": 630.0}]
  lines = reproduce.markdown_table(rows).splitlines()
  cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
  assert len(lines) == 4 and len(cells[0]) == len(reproduce.COLUMNS) + 3
  assert cells[0][2] == "linear top-1" and cells[0][-1] == "pretrain wall time"
  assert cells[2] == ["random init", "0", "28.1%", "n/a", "25.0%", "9.5%", "68.7%", "25.0%",
                      "69.0%", "30.0%", "32%", "49.0%", "48.6%", "n/a"]
  assert cells[3] == ["densecl", "1", "50.0%", *["n/a"] * 10, "10.5 min"]


def test_replace_section_keeps_the_rest_of_the_file():
  first = reproduce.replace_section("# Results\n\nthroughput: 100 img/s\n", "table 1")
  assert first.startswith("# Results\n\nthroughput: 100 img/s\n\n" + reproduce.BEGIN)
  second = reproduce.replace_section(first + "\nmore notes\n", "table 2")
  assert "table 1" not in second and "table 2" in second
  assert second.count(reproduce.BEGIN) == 1 and second.endswith("\nmore notes\n")
  assert reproduce.replace_section("", "t") == f"{reproduce.BEGIN}\nt\n{reproduce.END}\n"


def test_evaluate_backbone_and_dense_figure(tmp_path):
  backbone = models.Backbone("resnet18", models.get_backbone("resnet18"))
  evaluators = evaluate.from_config(
      {"knn": {"num_train": 40, "num_test": 20, "image_size": 32},
       "dense": {"num_train": 16, "num_test": 6, "image_size": 64, "steps": 10}}, backbone)
  results, dense_result = reproduce.evaluate_backbone(evaluators,
                                                      features.init_variables(backbone))
  assert set(results) == {"knn/top1", "dense/miou", "dense/miou_se", "dense/pixel_acc"}
  assert results["dense/miou"] == dense_result.miou
  # The dense probe's own bootstrap error is the one the verdicts use; k-NN's is binomial.
  errors = reproduce.standard_errors(evaluators, results)
  assert errors["dense/miou"] == results["dense/miou_se"] > 0
  assert errors["knn/top1"] == pytest.approx(
      np.sqrt(results["knn/top1"] * (1 - results["knn/top1"]) / 20))
  assert dense_result.predictions.shape == (6, 64, 64)

  truth = scenes.make_scenes(6, seed=0, split="probe_test", size=64)
  path = str(tmp_path / "dense.png")
  other = scenes.make_scenes(6, seed=0, split="probe_test", size=32)
  reproduce.dense_figure(
      [(truth["images"], truth["label_maps"],
        {"random init": dense_result.predictions, "perfect": truth["label_maps"]},
        {"random init": dense_result.miou, "perfect": 1.0}),
       # A second architecture's block, on scenes of its own size.
       (other["images"], other["label_maps"], {"perfect": other["label_maps"]},
        {"perfect": 1.0})], path)
  png = matplotlib.image.imread(path)
  assert png.shape[0] > 1000 and png[..., :3].std() > 0.05  # 7 rows; 4 rows are 748 px
  # Class colours: background black, every garment class its own colour.
  colours = reproduce.colourize(truth["label_maps"][0])
  assert colours.shape == (64, 64, 3)
  np.testing.assert_array_equal(colours[truth["label_maps"][0] == 0], 0)
  assert len({tuple(c) for c in reproduce.SEG_COLOURS}) == scenes.NUM_SEGMENTATION_CLASSES


def test_summary_marks_only_margins_beyond_twice_the_combined_error():
  rows = [{"name": "random init", "seed": s, "knn/top1": p, "se/knn/top1": 0.01}
          for s, p in enumerate((0.30, 0.32, 0.31))]
  rows += [{"name": "good", "seed": s, "knn/top1": p, "se/knn/top1": 0.01}
           for s, p in enumerate((0.40, 0.42, 0.41))]
  rows += [{"name": "close", "seed": s, "knn/top1": p, "se/knn/top1": 0.01}
           for s, p in enumerate((0.31, 0.33, 0.32))]
  summary = reproduce.summarize(rows, ["knn/top1"])
  floor = summary["random init"]["knn/top1"]
  assert floor["n"] == 3 and abs(floor["mean"] - 0.31) < 1e-12
  assert abs(floor["std"] - 0.01) < 1e-12  # ddof 1
  # Spread over seeds (0.01/√3) and the shared sampling error (0.01), combined.
  assert abs(floor["se"] - np.sqrt(0.01 ** 2 / 3 + 0.01 ** 2)) < 1e-12
  lines = {line.split("|")[1].strip(): line for line in
           reproduce.summary_table(summary).splitlines()[2:]}
  assert "✓" in lines["good"] and "41.0% ± 1.0" in lines["good"]
  assert "✗" in lines["close"]
  assert "✓" not in lines["random init"] and "✗" not in lines["random init"]
  # Per-row floors: "close" against a lower floor of its own (its architecture's) beats it.
  rows += [{"name": "low init", "seed": s, "knn/top1": p, "se/knn/top1": 0.01}
           for s, p in enumerate((0.20, 0.22, 0.21))]
  summary = reproduce.summarize(rows, ["knn/top1"])
  floors = {"good": "random init", "close": "low init", "random init": "random init",
            "low init": "low init"}
  lines = {line.split("|")[1].strip(): line for line in
           reproduce.summary_table(summary, floors).splitlines()[2:]}
  assert "✓" in lines["close"] and "✓" in lines["good"]
  assert not {"✓", "✗"} & set(lines["low init"])
  # A second reference row: its verdict follows in brackets, the first one unchanged.
  lines = {line.split("|")[1].strip(): line for line in reproduce.summary_table(
      summary, "random init", {"close": "low init", "good": "random init"}).splitlines()[2:]}
  assert "✗ (BN ✓)" in lines["close"] and "✓ (BN ✓)" in lines["good"]


def test_method_entries_name_their_variants():
  assert reproduce.parse_method("mocov2") == ("mocov2", "mocov2")
  assert reproduce.parse_method("mocov3:dilemma") == ("mocov3", "mocov3+dilemma")


def test_reproduce_end_to_end_on_the_test_variant(tmp_path, monkeypatch):
  """Two steps each of MoCo-v2 (ResNet) and MoCo v3 + DILEMMA (ViT, first seed only) on the
  `test` variant, tiny evaluators: each method against the random init of its own
  architecture; tables, curves, JSON, figures, section; the same command again reads every
  result back instead of recomputing it, and re-scores only a probe whose settings changed."""
  results_md = tmp_path / "RESULTS.md"
  results_md.write_text("# Benchmark results\n\nother section\n")
  tiny = {"knn": {"num_train": 40, "num_test": 20, "image_size": 32},
          "dense": {"num_train": 16, "num_test": 6, "image_size": 64, "steps": 5},
          "corr": {"type": "correspondence", "num_pairs": 4, "scene_size": 64,
                   "image_size": 64}}
  kwargs = dict(variant="test", total_steps=2, evals=tiny, results_md=str(results_md),
                figure=str(tmp_path / "dense.png"), curves_figure=str(tmp_path / "curves.png"),
                curve_points=2, one_seed=["mocov3:dilemma"], bn_scenes=64, progress=False)
  rows = reproduce.reproduce(str(tmp_path / "runs"), ["mocov2"], [3], **kwargs)
  # A BatchNorm network also gets its floor with re-estimated running statistics; a ViT not.
  assert [r["name"] for r in rows] == ["random init (resnet18)",
                                       "random init, BN re-estimated (resnet18)",
                                       "random init (vit_micro8)", "mocov2", "mocov3+dilemma"]
  assert rows[0]["knn/top1"] != rows[1]["knn/top1"] or rows[0]["dense/miou"] != rows[1][
      "dense/miou"]
  assert rows[3]["seed"] == 3 and rows[3]["wall_s"] > 0
  assert json.loads((tmp_path / "runs" / "mocov3+dilemma_seed3" / "config.json").read_text()
                    )["method"]["dilemma"]["enabled"]
  for row in rows:
    assert {"knn/top1", "dense/miou", "corr/argmax_acc", "corr/chance_acc"} <= set(row)
    assert 0 < row["se/knn/top1"] < 0.2  # sqrt(p(1-p)/20)
  text = results_md.read_text()
  assert text.startswith("# Benchmark results\n\nother section\n")
  assert "--one_seed=mocov3:dilemma --variant=test --total_steps=2`" in text
  assert re.search(r"\|\s+random init \(resnet18\) \|\s+3 \|", text)
  assert re.search(r"\|\s+random init, BN re-estimated \(resnet18\) \|\s+1 \|[^✓✗]*$", text,
                   re.M)
  assert re.search(r"\|\s+mocov2 \|\s+3 \|", text)
  # The summary, each method with its verdict against its own architecture's floor.
  for name in ("mocov2", "mocov3\\+dilemma"):
    assert re.search(rf"\|\s+{name} \|\s+1 \|.*[✓✗]", text)
  assert "![dense probe](dense.png)" in text and "![probe curves](curves.png)" in text
  assert (tmp_path / "dense.png").stat().st_size > 10_000
  assert (tmp_path / "curves.png").stat().st_size > 10_000
  results = json.loads((tmp_path / "runs" / "results.json").read_text())
  # The curve: random init at step 0, the checkpoint of step 1 (k-NN only), the final step.
  curve = results["curves"]["mocov2 s3"]
  assert sorted(map(int, curve)) == [0, 1, 2] and set(curve["1"]) == {"knn/top1"}
  assert (tmp_path / "runs" / "mocov2_seed3" / "config.json").exists()

  # Again: every number is read back (a killed reproduction resumes); no training, same table.
  (tmp_path / "runs" / "mocov2_seed3" / "checkpoints").rename(tmp_path / "moved")
  again = reproduce.reproduce(str(tmp_path / "runs"), ["mocov2"], [3], **kwargs)
  assert again == rows

  # A changed protocol of one probe: that probe is scored again for every backbone (from the
  # run's final checkpoint), and the others' numbers are read back. And one more random-init
  # seed (0) for the architecture of --methods only, scored by every probe.
  (tmp_path / "moved").rename(tmp_path / "runs" / "mocov2_seed3" / "checkpoints")
  scored_by = []
  original = reproduce.evaluate_backbone
  monkeypatch.setattr(reproduce, "evaluate_backbone",
                      lambda evaluators, variables: (scored_by.append(sorted(evaluators)),
                                                     original(evaluators, variables))[1])
  changed = {**tiny, "dense": {**tiny["dense"], "image_size": 32}}
  rescored = reproduce.reproduce(str(tmp_path / "runs"), ["mocov2"], [3],
                                 **{**kwargs, "evals": changed, "floor_seeds": 1})
  everything = sorted(changed)
  assert scored_by == [everything] * 2 + [["dense"]] * 5  # new floors; 3 old floors, 2 runs
  assert [(r["name"], r["seed"]) for r in rescored[:2]] == [
      ("random init (resnet18)", 0), ("random init, BN re-estimated (resnet18)", 0)]
  text = results_md.read_text()
  assert "--total_steps=2 --floor_seeds=1`" in text
  assert re.search(r"\|\s+random init \(resnet18\) \|\s+2 \|", text)  # seeds 0 and 3
  assert re.search(r"\|\s+random init \(vit_micro8\) \|\s+1 \|", text)
  for old, new in zip(rows, rescored[2:]):
    assert {k: v for k, v in old.items() if "dense" not in k} == {
        k: v for k, v in new.items() if "dense" not in k}
  cache = json.loads((tmp_path / "runs" / "mocov2_seed3" / "reproduce.json").read_text())
  assert cache["evals"]["dense"]["image_size"] == 32
  assert np.asarray(cache["dense_predictions"]).shape[1:] == (32, 32)


def test_a_backbone_variant_of_the_same_name_is_its_own_architecture():
  """ConMIM's BEiT-style ViT-micro is not MoCo v3's: it gets its own evaluators and floor."""
  from dense_ssl import methods
  backbones = {m: methods.create(reproduce._config(m, "test", 0, None)).backbone
               for m in ("mocov3", "mocov3:dilemma", "conmim", "mocov2")}
  arch, by_key = reproduce.architectures(backbones)
  assert arch == {"mocov3": "vit_micro8", "mocov3:dilemma": "vit_micro8",
                  "conmim": "vit_micro8-conmim", "mocov2": "resnet18"}
  assert by_key["vit_micro8-conmim"] == backbones["conmim"]


def test_a_shorter_budget_keeps_the_warm_up_share_of_the_run():
  """--total_steps=100 on a 2000-step variant: BYOL's 0.5 epoch of warm-up (156 steps) would
  outlast the run, so it shrinks with the budget; the methods without warm-up keep none."""
  from dense_ssl import optim
  full = reproduce._config("byol", "fmnist_scenes", 0, None)
  short = reproduce._config("byol", "fmnist_scenes", 0, 100)
  num = full.data.scenes_num_images
  full_d, short_d = optim.durations(full, num), optim.durations(short, num)
  assert (full_d.total_steps, short_d.total_steps) == (2000, 100)
  assert full_d.warmup_steps == 156
  assert short_d.warmup_steps == round(156 / 20)
  assert reproduce._config("mocov2", "fmnist_scenes", 0, 100).optim.warmup_epochs == 0.0
