"""MoCo-v2 vs DenseCL vs HoughCL on Fashion-MNIST scenes, one command, same budget for all.

    python benchmarks/reproduce.py [--workdir=runs/reproduce] [--methods=mocov2,densecl,houghcl]
        [--seeds=0] [--total_steps=N] [--variant=fmnist_scenes]

For every method and seed: pretrain `configs/<method>.py:fmnist_scenes` (the same backbone,
data, batch, steps and optimiser for all three; resumes an interrupted run), then evaluate the
final online backbone with the evaluators of `config.evals` (linear probe and k-NN on held-out
garments, dense-probe mIoU and correspondence accuracy on held-out scenes; see
dense_ssl/evaluate). A randomly initialised backbone is evaluated too, as the floor. Writes

  * the table into benchmarks/RESULTS.md, between the markers BEGIN and END (the rest of the
    file is kept), with the date, device and budget;
  * benchmarks/reproduce_dense.png: test scenes, their ground truth and each backbone's
    dense-probe prediction;
  * <workdir>/results.json with every number.

--total_steps overrides the variant's budget (e.g. a quick look) and --variant the config
variant (e.g. `test` for a smoke run); the section written says what was used.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `benchmarks`, `configs` and `dense_ssl` from this checkout

# pylint: disable=g-import-not-at-top,wrong-import-position
from dense_ssl import extras

matplotlib = extras.require("matplotlib", "benchmarks/reproduce.py's figure")
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from absl import app, flags

from benchmarks import common

RESULTS_MD = os.path.join(ROOT, "benchmarks", "RESULTS.md")
FIGURE = os.path.join(ROOT, "benchmarks", "reproduce_dense.png")
BEGIN = "<!-- reproduce.py: begin -->"
END = "<!-- reproduce.py: end -->"
# Table columns: (header, key in the evaluators' results, format).
COLUMNS = (
    ("linear top-1", "linear/top1", "{:.1%}"),
    ("k-NN top-1", "knn/top1", "{:.1%}"),
    ("dense mIoU", "dense/miou", "{:.1%}"),
    ("corr. argmax ±1", "corr/argmax_acc", "{:.1%}"),
    ("corr. argmax exact", "corr/argmax_acc_exact", "{:.1%}"),
    ("corr. Hough ±1", "corr/hough_acc", "{:.1%}"),
    ("corr. Hough exact", "corr/hough_acc_exact", "{:.1%}"),
    ("Hough identity share", "corr/hough_identity", "{:.0%}"),
    ("corr. Hough rev. 1 ±1", "corr/hough_v1_acc", "{:.1%}"),
    ("corr. identity ±1", "corr/identity_acc", "{:.1%}"),
)
SEG_COLOURS = np.array(
    [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
     [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]],
    np.uint8)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
  """Rows {"name", "seed", "wall_s", <result keys>} as a markdown table (missing = n/a)."""
  columns = ["backbone", "seed", *(c[0] for c in COLUMNS), "pretrain wall time"]
  cells = []
  for row in rows:
    cell = {"backbone": row["name"], "seed": str(row.get("seed", "n/a"))}
    cell.update({header: fmt.format(row[key]) for header, key, fmt in COLUMNS if key in row})
    if row.get("wall_s") is not None:
      cell["pretrain wall time"] = f"{row['wall_s'] / 60:.1f} min"
    cells.append(cell)
  return common.table(cells, columns)


def replace_section(text: str, section: str) -> str:
  """`text` with what lies between BEGIN and END replaced by `section` (appended if absent)."""
  block = f"{BEGIN}\n{section.strip()}\n{END}"
  if BEGIN in text and END in text:
    return text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
  return (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"


def colourize(label_map: np.ndarray) -> np.ndarray:
  """(H, W) class map -> (H, W, 3) uint8 with one fixed colour per class (black background)."""
  return SEG_COLOURS[np.asarray(label_map)]


def dense_figure(images: np.ndarray, truth: np.ndarray, predictions: dict[str, np.ndarray],
                 miou: dict[str, float], path: str, num: int = 6) -> None:
  """Rows: scene, ground truth, then each backbone's dense-probe prediction (with its mIoU)."""
  rows = [("scene", images[:num]), ("ground truth", [colourize(t) for t in truth[:num]])]
  rows += [(f"{name} ({miou[name]:.1%} mIoU)", [colourize(p) for p in pred[:num]])
           for name, pred in predictions.items()]
  fig, axes = plt.subplots(len(rows), num, figsize=(1.6 * num, 1.7 * len(rows)),
                           squeeze=False)
  for r, (title, pictures) in enumerate(rows):
    for c, picture in enumerate(pictures):
      axes[r, c].imshow(picture, interpolation="nearest")
      axes[r, c].set_axis_off()
    axes[r, 0].set_title(title, fontsize=8, loc="left")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def evaluate_backbone(evaluators: dict[str, Any], variables: Any) -> tuple[dict[str, float],
                                                                           Any]:
  """All evaluators' results {"<name>/<key>"}; the dense probe's full result for the figure."""
  from dense_ssl.evaluate import dense
  results, dense_result = {}, None
  for name, evaluator in evaluators.items():
    if isinstance(evaluator, dense.DenseProbe):
      dense_result = evaluator.evaluate(variables)
      pairs = {"miou": dense_result.miou, "pixel_acc": dense_result.pixel_acc}.items()
    else:
      pairs = evaluator.run(variables)
    results.update({f"{name}/{k}": float(v) for k, v in pairs})
  return results, dense_result


def _config(method: str, variant: str, seed: int, total_steps: int | None) -> Any:
  from dense_ssl import config_errors
  config = config_errors.load_config(os.path.join(ROOT, f"configs/{method}.py:{variant}"))
  overrides = {"seed": seed}
  if total_steps:
    overrides.update(total_epochs=0.0, total_steps=total_steps)
  return config_errors.override(config, overrides)


def _budget(config: Any) -> str:
  duration = (f"{config.total_steps} steps" if config.total_steps
              else f"{config.total_epochs} epochs")
  return (f"{config.model.name} at {config.data.image_size} px, batch {config.batch_size}, "
          f"{duration}, {config.optim.name} lr {config.optim.lr}, data {config.data.source}")


def reproduce(workdir: str, methods: Sequence[str], seeds: Sequence[int], *,
              variant: str = "fmnist_scenes", total_steps: int | None = None,
              evals: dict[str, Any] | None = None, results_md: str = RESULTS_MD,
              figure: str = FIGURE) -> list[dict[str, Any]]:
  """Pretrains and evaluates every (method, seed); writes `results_md` and `figure`.

  `evals` replaces the configs' `config.evals` (default: theirs, else DEFAULT_EVALS); the
  evaluators are built once, so every backbone is scored on the same held-out data.
  """
  import jax
  from dense_ssl import config_errors, evaluate, methods as methods_lib, train
  from dense_ssl.evaluate import features

  first = _config(methods[0], variant, seeds[0], total_steps)
  backbone = methods_lib.create(first).backbone
  evaluators = evaluate.from_config(evals or first.evals or evaluate.DEFAULT_EVALS, backbone)
  random_init = features.init_variables(backbone, seed=seeds[0])
  results, dense = evaluate_backbone(evaluators, random_init)
  rows = [{"name": "random init", "seed": seeds[0], **results}]
  dense_results = {"random init": dense}
  for method in methods:
    for seed in seeds:
      # The script evaluates every backbone itself, with the evaluators built once above (same
      # held-out data for all), so the runs' own end-of-training evaluation is switched off.
      config = config_errors.override(_config(method, variant, seed, total_steps), {"evals": {}})
      start = time.perf_counter()
      state = train.run(config, os.path.join(workdir, f"{method}_seed{seed}"))
      wall = time.perf_counter() - start
      variables = methods_lib.create(config).backbone_variables(
          jax.device_get(state.params), jax.device_get(state.batch_stats))
      results, dense_results[f"{method} s{seed}"] = evaluate_backbone(evaluators, variables)
      rows.append({"name": method, "seed": seed, "wall_s": wall, **results})
      print(markdown_table(rows), flush=True)

  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(rows, f, indent=2)
  if dense is not None:
    dense_figure(dense.images, dense.label_maps,
                 {k: r.predictions for k, r in dense_results.items()},
                 {k: r.miou for k, r in dense_results.items()}, figure)
  command = (f"python benchmarks/reproduce.py --methods={','.join(methods)} "
             f"--seeds={','.join(map(str, seeds))}"
             + (f" --variant={variant}" if variant != "fmnist_scenes" else "")
             + (f" --total_steps={total_steps}" if total_steps else ""))
  chance = rows[0].get("corr/chance_acc")
  section = (f"## MoCo-v2 vs DenseCL vs HoughCL on Fashion-MNIST scenes\n\n"
             f"{common.machine_header(jax.devices())}\n\n`{command}`\n\n"
             f"Budget (every method): {_budget(first)}. Frozen online backbone, evaluators of "
             f"dense_ssl/evaluate: probes fitted on held-out garments/scenes, correspondence = "
             f"C5 matches vs geometry within one cell"
             + (f" (chance {chance:.1%})" if chance is not None else "") + ".\n\n"
             f"{markdown_table(rows)}\n")
  if dense is not None:
    link = os.path.relpath(figure, os.path.dirname(os.path.abspath(results_md)))
    section += f"\nDense-probe predictions vs ground truth: ![dense probe]({link})\n"
  old = open(results_md).read() if os.path.exists(results_md) else "# Benchmark results\n"
  with open(results_md, "w") as f:
    f.write(replace_section(old, section))
  return rows


def _define_flags() -> None:
  # Only when run as a program, so that tests can import this file.
  flags.DEFINE_string("workdir", "runs/reproduce", "Where the runs are kept (resumed).")
  flags.DEFINE_list("methods", ["mocov2", "densecl", "houghcl"], "Methods to compare.")
  flags.DEFINE_list("seeds", ["0"], "Seeds: one pretraining run per method and seed.")
  flags.DEFINE_integer("total_steps", None, "Overrides the variant's budget.")
  flags.DEFINE_string("variant", "fmnist_scenes", "Config variant of every method.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  reproduce(f.workdir, f.methods, [int(s) for s in f.seeds], variant=f.variant,
            total_steps=f.total_steps)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  _define_flags()
  app.run(main)
