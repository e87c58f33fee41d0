"""Every method against random init on Fashion-MNIST scenes: one command for the whole table.

    python benchmarks/reproduce.py [--workdir=runs/reproduce] [--methods=mocov2,densecl,houghcl]
        [--seeds=0,1,2] [--one_seed=byol,mocov3,mocov3:dilemma] [--total_steps=N]
        [--variant=fmnist_scenes] [--curve_points=4] [--floor_seeds=N]

For every method and seed: pretrain `configs/<method>.py:<variant>` (the same data and batch
for all, one backbone and one number of steps per family; resumes an interrupted run;
`mocov3:dilemma` adds the config's `dilemma` variant), then evaluate the final online
backbone with the evaluators of `config.evals` (linear probe and k-NN on held-out garments,
dense-probe mIoU and correspondence accuracy on held-out scenes, and what the method's config
adds, e.g. ConMIM's fine-tuning; see dense_ssl/evaluate), and its intermediate checkpoints with
the cheap probes (k-NN, linear) for the curves. A randomly initialised backbone of the same
architecture, one per seed (and seeds 0..N-1 with --floor_seeds=N for the architectures of
--methods), is the floor; for a BatchNorm network a second reference row
reads the same weights with running statistics re-estimated on pretraining scenes (the
eval-mode floor of a random init normalises nothing, RESULTS.md §4b). Every result is cached
under --workdir: the same command after a kill continues where it stopped. Writes

  * the tables into benchmarks/RESULTS.md, between the markers BEGIN and END (the rest of the
    file is kept), with the date, device, budget and total wall time: mean ± std over seeds
    with a ✓/✗ verdict against random init (twice the combined standard error), and every run;
  * benchmarks/reproduce_curves.png: the probes over pretraining steps, per method;
  * benchmarks/reproduce_dense.png: test scenes, their ground truth and each backbone's
    dense-probe prediction;
  * <workdir>/results.json with every number.

--total_steps overrides the variant's budget (e.g. a quick look; the lr warm-up keeps its share
of the run) and --variant the config variant (e.g. `test` for a smoke run); the section
written says what was used.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from typing import Any, Mapping, Sequence

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
FIGURE_SCENES = 6  # columns of the dense-probe figure
# Pretraining scenes whose statistics the BN re-estimated floor averages (64 batches of 32).
BN_SCENES = 2048
CURVES = os.path.join(ROOT, "benchmarks", "reproduce_curves.png")
BEGIN = "<!-- reproduce.py: begin -->"
END = "<!-- reproduce.py: end -->"
# Table columns: (header, key in the evaluators' results, format).
COLUMNS = (
    ("linear top-1", "linear/top1", "{:.1%}"),
    ("fine-tune top-1", "finetune/top1", "{:.1%}"),
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
# The claims the table checks against random init (the acceptance of the benchmark).
VERDICT_KEYS = ("linear/top1", "finetune/top1", "knn/top1", "dense/miou")
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


def dense_figure(panels: Sequence[tuple[np.ndarray, np.ndarray, dict[str, np.ndarray],
                                        dict[str, float]]],
                 path: str, num: int = 6) -> None:
  """One block of rows per (images, truth, {name: predictions}, {name: mIoU}) panel: the test
  scenes, their ground truth, then each backbone's dense-probe prediction with its mIoU."""
  rows = []
  for images, truth, predictions, miou in panels:
    side = images.shape[1]
    rows += [(f"scene ({side} px)", images[:num]),
             ("ground truth", [colourize(t) for t in truth[:num]])]
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
      pairs = dense_result.scores().items()
    else:
      pairs = evaluator.run(variables)
    results.update({f"{name}/{k}": float(v) for k, v in pairs})
  return results, dense_result


def parse_method(spec: str) -> tuple[str, str]:
  """A --methods entry -> (its config file's name, its row name): "mocov3:dilemma" is
  configs/mocov3.py with the `dilemma` variant after the benchmark's, row "mocov3+dilemma"."""
  file, _, extra = spec.partition(":")
  return file, "+".join([file, *(v for v in extra.split(",") if v)])


def architectures(backbones: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
  """({method: its architecture's key}, {key: backbone}) of {method: backbone}.

  An architecture is the backbone module itself, not only its name: ConMIM's BEiT-style
  ViT-micro (relative position bias, no absolute embedding) has other parameters than MoCo
  v3's. The key is the backbone's name, or name-method for a later variant of that name.
  """
  arch, by_key = {}, {}
  for method, backbone in backbones.items():
    same = [k for k, b in by_key.items() if b == backbone]
    if same:
      arch[method] = same[0]
    else:
      arch[method] = (backbone.name if backbone.name not in by_key
                      else f"{backbone.name}-{parse_method(method)[1]}")
      by_key[arch[method]] = backbone
  return arch, by_key


def _config(method: str, variant: str, seed: int, total_steps: int | None,
            curve_points: int = 0) -> Any:
  from dense_ssl import config_errors
  file, _, extra = method.partition(":")
  variants = ",".join(v for v in (variant, extra) if v)
  config = config_errors.load_config(os.path.join(ROOT, f"configs/{file}.py:{variants}"))
  overrides = {"seed": seed}
  if total_steps:
    overrides.update(total_epochs=0.0, total_steps=total_steps)
    if config.total_steps:
      # The warm-up keeps its share of the run: a fixed number of epochs would be most or all
      # of a short look (BYOL's 0.5 epoch is 156 steps, more than 100).
      overrides["optim.warmup_epochs"] = (config.optim.warmup_epochs * total_steps
                                          / config.total_steps)
  if curve_points and (total_steps or config.total_steps):
    # A checkpoint per point of the probe curves, all kept.
    steps = total_steps or config.total_steps
    overrides.update(checkpoint_every_steps=max(1, steps // curve_points),
                     keep_checkpoints=curve_points + 1)
  return config_errors.override(config, overrides)


def _budget(config: Any) -> str:
  from dense_ssl import optim
  duration = (f"{config.total_steps} steps" if config.total_steps
              else f"{config.total_epochs} epochs")
  return (f"{config.model.name} at {config.data.image_size} px, batch {config.batch_size}, "
          f"{duration}, {config.optim.name} peak lr "
          f"{optim.peak_lr(config.optim, config.batch_size):.3g}, data {config.data.source}")


def _cached(path: str, compute: Any) -> dict[str, Any]:
  """`compute()`'s JSON-able result, stored at `path` and read back on the next call: a killed
  reproduction continues where it stopped (the training runs resume from their checkpoints)."""
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  result = compute()
  _write_json(path, result)
  return result


def _write_json(path: str, value: Any) -> None:
  """Writes `value` to `path` atomically: a kill leaves the old file or the new one."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=2)
  os.replace(path + ".tmp", path)


def _evaluator_of(key: str) -> str:
  """The evaluator a result key belongs to: "knn/top1" and "se/knn/top1" -> "knn"."""
  return key.split("/")[1 if key.startswith("se/") else 0]


def _cached_scores(path: str, entries: Mapping[str, Any], rescore: Any,
                   compute: Any = None) -> dict[str, Any]:
  """`_cached` for a backbone's scores, with each evaluator's settings (`entries`, name ->
  config entry) kept next to its numbers. `rescore(names)` scores those evaluators (a
  `scored`-like dict); `compute()`, by default all of them, makes a missing cache (a
  pretraining run passes its training too). An evaluator whose settings changed since, or
  that a cache from before the settings were kept does not name, is scored again and its
  numbers replaced; the others are read back. A changed protocol of one probe re-scores that
  probe only, and a number is never read back under settings other than those it was scored
  with.
  """
  entries = json.loads(json.dumps(dict(entries)))  # tuples as lists, as they read back
  compute = compute or (lambda: rescore(list(entries)))
  result = _cached(path, lambda: {**compute(), "evals": entries})
  stale = [name for name, entry in entries.items() if result.get("evals", {}).get(name) != entry]
  if not stale:
    return result
  fresh = rescore(stale)
  kept = {k: v for k, v in result["results"].items()
          if _evaluator_of(k) in entries and _evaluator_of(k) not in stale}
  result = {**result, "results": {**kept, **fresh["results"]}, "evals": entries}
  if fresh.get("dense_miou") is not None:
    result.update(dense_miou=fresh["dense_miou"], dense_predictions=fresh["dense_predictions"])
  _write_json(path, result)
  return result


def standard_errors(evaluators: dict[str, Any], row: dict[str, Any]) -> dict[str, float]:
  """Sampling standard error of each probe score of one backbone: sqrt(p(1-p)/n) of an
  accuracy over the evaluator's n held-out test images (the same images for every backbone),
  or the error an evaluator reports itself as "<key>_se" (the dense probe's bootstrap)."""
  out = {k[:-len("_se")]: v for k, v in row.items() if k.endswith("_se")}
  for name, evaluator in evaluators.items():
    n = getattr(evaluator, "num_test", None)
    key = f"{name}/top1"
    if n and key in row:
      p = row[key]
      out[key] = float(np.sqrt(max(p * (1 - p), 1e-12) / n))
  return out


def summarize(rows: Sequence[dict[str, Any]], keys: Sequence[str]
              ) -> dict[str, dict[str, dict[str, float]]]:
  """{name: {key: {"mean", "std", "se", "n"}}} over the rows (seeds) of each backbone.

  `se` is the standard error of the mean: the spread over seeds (std/√n, ddof 1) combined with
  the held-out set's sampling error (`se/<key>` of the rows, from `standard_errors`), which is
  shared by the seeds and so does not average out.
  """
  out: dict[str, dict[str, dict[str, float]]] = {}
  for name in dict.fromkeys(r["name"] for r in rows):
    group = [r for r in rows if r["name"] == name]
    stats = {}
    for key in keys:
      values = np.array([r[key] for r in group if key in r], np.float64)
      if not len(values):
        continue
      std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
      sampling = np.mean([r.get(f"se/{key}", 0.0) for r in group])
      se = float(np.sqrt(std ** 2 / len(values) + sampling ** 2))
      stats[key] = {"mean": float(values.mean()), "std": std, "se": se, "n": len(values)}
    out[name] = stats
  return out


def _verdict(stats: dict[str, float], base: dict[str, float]) -> str:
  """✓ when `stats` beats `base` by more than twice their combined standard error, else ✗."""
  return "✓" if stats["mean"] - base["mean"] > 2 * np.hypot(stats["se"], base["se"]) else "✗"


def summary_table(summary: dict[str, dict[str, dict[str, float]]],
                  floor: str | Mapping[str, str] = "random init",
                  second_floor: Mapping[str, str] | None = None) -> str:
  """Mean ± std over seeds per backbone; a cell is marked ✓ when it beats its floor by more
  than twice the combined standard error, ✗ when it does not. `floor` names the floor's row,
  or maps each row to its own (the random init of its architecture); `second_floor` maps rows
  to a second reference row (a BatchNorm network's BN re-estimated random init), whose verdict
  follows in brackets, e.g. "25.2% ± 2.5 ✗ (BN ✓)"."""
  floors = floor if isinstance(floor, Mapping) else {name: floor for name in summary}
  second_floor = second_floor or {}
  columns = ["backbone", "seeds", *(c[0] for c in COLUMNS)]
  cells = []
  for name, stats in summary.items():
    cell = {"backbone": name,
            "seeds": str(max((s["n"] for s in stats.values()), default=0))}
    for header, key, fmt in COLUMNS:
      if key not in stats:
        continue
      s, text = stats[key], fmt.format(stats[key]["mean"])
      if s["n"] > 1:
        text += " ± " + fmt.format(s["std"]).rstrip("%")
      base = summary.get(floors.get(name, ""), {}).get(key)
      if name != floors.get(name) and base is not None and key in VERDICT_KEYS:
        text += " " + _verdict(s, base)
        second = summary.get(second_floor.get(name, ""), {}).get(key)
        if second is not None:
          text += f" (BN {_verdict(s, second)})"
      cell[header] = text
    cells.append(cell)
  return common.table(cells, columns)


FLOOR_STYLES = ("--", ":", "-.", (0, (6, 2, 1, 2, 1, 2)))


def curve_figure(curves: dict[str, dict[int, dict[str, float]]], keys: Sequence[str],
                 path: str, floors: dict[str, dict[str, float]] | None = None) -> None:
  """One panel per key: each method's value (mean over seeds) over its pretraining steps, each
  architecture's random-init value ({label: results}) as a dashed or dotted line."""
  fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
  for ax, key in zip(axes[0], keys):
    for i, (name, by_step) in enumerate(curves.items()):
      steps = sorted(s for s, r in by_step.items() if key in r)
      if steps:
        # Past the 10 colours of the cycle, the colours come back dashed.
        ax.plot(steps, [by_step[s][key] for s in steps], marker="o", ms=3, label=name,
                color=f"C{i % 10}", linestyle=("-", "--", ":")[i // 10 % 3])
    for i, (label, floor) in enumerate((floors or {}).items()):
      if key in floor:  # Black, then grey, line styles: every floor is drawn, however many.
        ax.axhline(floor[key], color="k" if i < len(FLOOR_STYLES) else "0.55",
                   ls=FLOOR_STYLES[i % len(FLOOR_STYLES)], lw=1, label=label)
    ax.set_title(key, fontsize=9)
    ax.set_xlabel("pretraining step")
    ax.grid(alpha=0.3)
  axes[0, -1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
  fig.tight_layout()
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)


def _mean_curves(runs: dict[tuple[str, int], dict[int, dict[str, float]]]
                 ) -> dict[str, dict[int, dict[str, float]]]:
  """{method: {step: {key: mean over seeds}}} from {(method, seed): {step: results}}."""
  out: dict[str, dict[int, dict[str, float]]] = {}
  for method in dict.fromkeys(m for m, _ in runs):
    seeds = [c for (m, _), c in runs.items() if m == method]
    steps = sorted(set.intersection(*(set(c) for c in seeds)))
    out[method] = {s: {k: float(np.mean([c[s][k] for c in seeds]))
                       for k in seeds[0][s] if all(k in c[s] for c in seeds)} for s in steps}
  return out


def reproduce(workdir: str, methods: Sequence[str], seeds: Sequence[int], *,
              variant: str = "fmnist_scenes", total_steps: int | None = None,
              evals: dict[str, Any] | None = None, results_md: str = RESULTS_MD,
              figure: str = FIGURE, curves_figure: str = CURVES,
              curve_points: int = 4, curve_evals: Sequence[str] = ("knn", "linear"),
              one_seed: Sequence[str] = (), bn_scenes: int = BN_SCENES,
              floor_seeds: int = 0, progress: bool = True) -> list[dict[str, Any]]:
  """Pretrains and evaluates every (method, seed); writes `results_md` and the figures.

  `methods` run at every seed, `one_seed` at the first seed only; an entry is a config file's
  name with optional extra variants ("mocov3:dilemma", see `parse_method`). `evals` replaces
  the configs' `config.evals` (default: theirs, else DEFAULT_EVALS). The floor of a method is
  random init of its own architecture, one per seed, and for the architectures of `methods`
  also seeds 0 .. `floor_seeds` - 1 (random init is cheap to score, and its spread over
  seeds, not the test sets, limits the verdicts); the evaluators are built once per
  architecture (the union of its methods' `config.evals`), so every backbone of an
  architecture is scored on the same held-out data, and each method by its own evaluators.
  Each run keeps `curve_points` checkpoints, and the `curve_evals` evaluators score each of
  them for the probe curves. The BN re-estimated floor reads `bn_scenes` pretraining scenes.
  Every result is cached in `workdir`, so running the same command again continues a killed
  reproduction.
  """
  import jax
  from tqdm import tqdm
  from dense_ssl import checkpoint, config_errors, evaluate, methods as methods_lib, train
  from dense_ssl.data import scenes
  from dense_ssl.evaluate import features

  started = time.perf_counter()
  # Every method's first seed before the further seeds: a stopped command has a row of each.
  runs = [(m, seeds[0]) for m in [*methods, *(m for m in one_seed if m not in methods)]]
  runs += [(m, s) for s in seeds[1:] for m in methods]
  specs = list(dict.fromkeys(m for m, _ in runs))
  configs = {spec: _config(spec, variant, seeds[0], total_steps) for spec in specs}
  arch, backbones = architectures({spec: methods_lib.create(c).backbone
                                   for spec, c in configs.items()})
  union, own = {}, {}
  for spec, config in configs.items():
    own[spec] = dict(evals or config.evals.to_dict() or evaluate.DEFAULT_EVALS)
    for name, entry in own[spec].items():
      union.setdefault(arch[spec], {}).setdefault(name, entry)
  evaluators = {a: evaluate.from_config(union[a], backbones[a]) for a in backbones}
  # Initialised at the size its methods train at: a relative position bias keeps that window.
  image_size = {arch[spec]: c.data.image_size for spec, c in reversed(configs.items())}
  data = {arch[spec]: c.data for spec, c in reversed(configs.items())}
  floor_name = {a: f"random init ({a})" for a in backbones}
  bn_floor_name = {a: f"random init, BN re-estimated ({a})" for a in backbones}
  # The pretraining scenes' own style (background pool, garment colour); `sources` would draw
  # the same ones but imports TensorFlow.
  pretrain_scenes = functools.lru_cache(lambda a: scenes.make_scenes(
      bn_scenes, seed=0, split="pretrain", size=image_size[a],
      background_pool=int(data[a].get("scenes_background_pool", 0)),
      tint=bool(data[a].get("scenes_tint", True)))["images"])
  extra_floors = {arch[m] for m in methods}
  init_seeds = {a: sorted({s for m, s in runs if arch[m] == a}
                          | (set(range(floor_seeds)) if a in extra_floors else set()))
                for a in backbones}
  random_init = functools.lru_cache(lambda a, seed: features.init_variables(
      backbones[a], seed=seed, image_size=image_size[a]))
  has_bn = {a: bool(jax.tree.leaves(random_init(a, init_seeds[a][0])["batch_stats"]))
            for a in backbones}
  bar = tqdm(total=len(runs) + sum(len(s) * (1 + has_bn[a]) for a, s in init_seeds.items()),
             unit="run", disable=not progress)

  def scored(chosen: dict[str, Any], variables: Any) -> dict[str, Any]:
    results, dense = evaluate_backbone(chosen, variables)
    results.update({f"se/{k}": v for k, v in standard_errors(chosen, results).items()})
    # The figure's first scenes only: the whole prediction would make the cache megabytes.
    return {"results": results, "dense_miou": None if dense is None else dense.miou,
            "dense_predictions": None if dense is None
            else np.asarray(dense.predictions[:FIGURE_SCENES]).tolist()}

  rows, dense_results, curves, floor_rows = [], {}, {}, {}
  for a, backbone in backbones.items():
    for seed in init_seeds[a]:
      bar.set_description(f"{floor_name[a]} s{seed}")
      cached = _cached_scores(
          os.path.join(workdir, f"random_init_{a}_seed{seed}.json"), union[a],
          lambda names: scored({n: evaluators[a][n] for n in names}, random_init(a, seed)))
      floor_rows[(a, seed)] = {"name": floor_name[a], "seed": seed, **cached["results"]}
      rows.append(floor_rows[(a, seed)])
      dense_results.setdefault(a, {}).setdefault(floor_name[a], cached)
      bar.update()
      if not has_bn[a]:
        continue
      # The same random weights with running statistics of the pretraining scenes: a reference
      # row for a BatchNorm network, whose eval-mode floor above is un-normalised (RESULTS §4b).
      bar.set_description(f"{bn_floor_name[a]} s{seed}")
      def normalised(a=a, seed=seed, backbone=backbone):
        return features.reestimate_batch_stats(backbone, random_init(a, seed),
                                               pretrain_scenes(a))

      cached = _cached_scores(
          os.path.join(workdir, f"random_init_bn_{a}_seed{seed}.json"), union[a],
          lambda names: scored({n: evaluators[a][n] for n in names}, normalised()))
      rows.append({"name": bn_floor_name[a], "seed": seed, **cached["results"]})
      bar.update()
  for spec, seed in runs:
    method = parse_method(spec)[1]
    bar.set_description(f"{method} s{seed}")
    run_dir = os.path.join(workdir, f"{method}_seed{seed}")
    # The script evaluates every backbone itself, with the evaluators built once above (same
    # held-out data for all), so the runs' own end-of-training evaluation is switched off.
    config = config_errors.override(
        _config(spec, variant, seed, total_steps, curve_points), {"evals": {}})
    mine = {k: evaluators[arch[spec]][k] for k in own[spec]}

    def pretrain_and_score():
      begin = time.perf_counter()
      resumed = bool(checkpoint.saved_steps(run_dir))
      state = train.run(config, run_dir)
      wall = time.perf_counter() - begin
      variables = methods_lib.create(config).backbone_variables(
          jax.device_get(state.params), jax.device_get(state.batch_stats))
      return {**scored(mine, variables), "wall_s": wall, "resumed": resumed,
              "step": int(jax.device_get(state.step))}

    cached = _cached_scores(
        os.path.join(run_dir, "reproduce.json"), {n: union[arch[spec]][n] for n in mine},
        lambda names: scored({n: mine[n] for n in names}, checkpoint.load_backbone(run_dir)[2]),
        pretrain_and_score)
    rows.append({"name": method, "seed": seed, "wall_s": cached["wall_s"],
                 **cached["results"]})
    dense_results.setdefault(arch[spec], {})[f"{method} s{seed}"] = cached
    curve = {0: {k: v for k, v in floor_rows[(arch[spec], seed)].items()
                 if "/" in k and not k.startswith("se/")}}
    curve[cached["step"]] = cached["results"]
    # Intermediate checkpoints, and points scored before (their checkpoints may be gone).
    cheap = {k: v for k, v in mine.items() if k in curve_evals}
    scored_before = [int(f[len("curve_"):-len(".json")]) for f in os.listdir(run_dir)
                     if f.startswith("curve_") and f.endswith(".json")]
    for step in sorted(set(checkpoint.saved_steps(run_dir) + scored_before) - set(curve)):

      def score_checkpoint(step=step):
        _, _, variables = checkpoint.load_backbone(run_dir, step)
        return evaluate.run_all(cheap, variables)

      curve[step] = _cached(os.path.join(run_dir, f"curve_{step}.json"), score_checkpoint)
    curves[(method, seed)] = dict(sorted(curve.items()))
    bar.update()
    print("\n" + markdown_table(rows), flush=True)
  bar.close()
  total_wall = time.perf_counter() - started

  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"rows": rows, "curves": {f"{m} s{s}": c for (m, s), c in curves.items()}},
              f, indent=2)
  summary = summarize(rows, [c[1] for c in COLUMNS])
  floors = {name: {k: v["mean"] for k, v in summary[name].items()}
            for a in backbones for name in (floor_name[a], bn_floor_name[a]) if name in summary}
  curve_keys = list(dict.fromkeys(f"{name}/top1" for a in backbones
                                  for name in evaluators[a] if name in curve_evals))
  if curve_keys:
    curve_figure(_mean_curves(curves), curve_keys, curves_figure, floors)
  # One block per dense-probe setting: architectures probed alike (the ViTs) share the test
  # scenes and a block; a ResNet probed at another size reads other scenes.
  panels = {}
  for a, by_name in dense_results.items():
    ok = {k: v for k, v in by_name.items() if v.get("dense_predictions") is not None}
    name = next((n for n, e in evaluators[a].items() if hasattr(e, "evaluate")), None)
    if not ok or name is None:
      continue
    key = json.dumps(union[a][name], sort_keys=True, default=str)
    if key not in panels:
      test = evaluators[a][name].data()[1]
      panels[key] = (test["images"][:FIGURE_SCENES], test["label_maps"][:FIGURE_SCENES], {}, {})
    _, _, predictions, miou = panels[key]
    predictions.update({k: np.asarray(v["dense_predictions"]) for k, v in ok.items()})
    miou.update({k: v["dense_miou"] for k, v in ok.items()})
  panels = list(panels.values())
  if panels:
    dense_figure(panels, figure, FIGURE_SCENES)
  extra = [m for m in one_seed if m not in methods]
  command = (f"python benchmarks/reproduce.py --methods={','.join(methods)} "
             f"--seeds={','.join(map(str, seeds))}"
             + (f" --one_seed={','.join(extra)}" if extra else "")
             + (f" --variant={variant}" if variant != "fmnist_scenes" else "")
             + (f" --total_steps={total_steps}" if total_steps else "")
             + (f" --floor_seeds={floor_seeds}" if floor_seeds else ""))
  chance = rows[0].get("corr/chance_acc")
  # Grouped by the budget itself: methods of one architecture may differ in optimiser or lr.
  by_budget = {}
  for m in specs:
    by_budget.setdefault(_budget(configs[m]), []).append(parse_method(m)[1])
  budgets = "; ".join(f"{', '.join(names)}: {b}" for b, names in by_budget.items())
  row_floors = {parse_method(m)[1]: floor_name[arch[m]] for m in specs}
  row_floors.update({f: f for f in [*floor_name.values(), *bn_floor_name.values()]})
  bn_floors = {parse_method(m)[1]: bn_floor_name[arch[m]] for m in specs if has_bn[arch[m]]}
  section = (f"## Every method vs random init on Fashion-MNIST scenes\n\n"
             f"{common.machine_header(jax.devices())}\n\n`{command}`\n\n"
             f"Budgets: {budgets}. Frozen online backbone, evaluators of "
             f"dense_ssl/evaluate: probes fitted on held-out garments/scenes, correspondence = "
             f"final-map matches vs geometry within one cell"
             + (f" (chance {chance:.1%})" if chance is not None else "") + ". "
             f"Whole command: {total_wall / 60:.1f} min wall (cached runs count only their "
             f"evaluation).\n\n"
             f"Mean ± std over seeds; ✓ / ✗: beats the random init of its architecture by more "
             f"than twice the combined standard error (seeds' spread and the held-out sets' "
             f"sampling error), or not; (BN ✓ / ✗): the same against the BN re-estimated random "
             f"init of a BatchNorm network.\n\n"
             f"{summary_table(summary, row_floors, bn_floors)}\n\n"
             f"Every run:\n\n{markdown_table(rows)}\n")
  here = os.path.dirname(os.path.abspath(results_md))
  if curve_keys:
    section += (f"\nProbe curves over pretraining (mean over seeds): "
                f"![probe curves]({os.path.relpath(curves_figure, here)})\n")
  if panels:
    section += (f"\nDense-probe predictions vs ground truth: "
                f"![dense probe]({os.path.relpath(figure, here)})\n")
  old = open(results_md).read() if os.path.exists(results_md) else "# Benchmark results\n"
  with open(results_md, "w") as f:
    f.write(replace_section(old, section))
  return rows


def seed_index(rows: Sequence[dict[str, Any]], seed: int) -> int:
  """Index of the random-init row of `seed` (the step-0 point of every curve of that seed)."""
  return next(i for i, r in enumerate(rows) if r["name"] == "random init" and r["seed"] == seed)


def _define_flags() -> None:
  # Only when run as a program, so that tests can import this file.
  flags.DEFINE_string("workdir", "runs/reproduce", "Where the runs are kept (resumed).")
  flags.DEFINE_list("methods", ["mocov2", "densecl", "houghcl"], "Methods to compare.")
  flags.DEFINE_list("seeds", ["0"], "Seeds: one pretraining run per method and seed.")
  flags.DEFINE_list("one_seed", [], "More methods, run at the first seed only.")
  flags.DEFINE_integer("total_steps", None, "Overrides the variant's budget.")
  flags.DEFINE_string("variant", "fmnist_scenes", "Config variant of every method.")
  flags.DEFINE_string("out_dir", os.path.dirname(RESULTS_MD),
                      "Where RESULTS.md (its section) and the two figures are written; a "
                      "scratch folder keeps a trial run out of benchmarks/.")
  flags.DEFINE_integer("curve_points", 4, "Checkpoints per run scored for the probe curves.")
  flags.DEFINE_integer("floor_seeds", 0, "Random-init seeds 0..N-1 for the architectures of "
                       "--methods, besides the seeds of their runs.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  out = f.out_dir
  reproduce(f.workdir, f.methods, [int(s) for s in f.seeds], variant=f.variant,
            total_steps=f.total_steps, curve_points=f.curve_points, one_seed=f.one_seed,
            floor_seeds=f.floor_seeds,
            results_md=os.path.join(out, os.path.basename(RESULTS_MD)),
            figure=os.path.join(out, os.path.basename(FIGURE)),
            curves_figure=os.path.join(out, os.path.basename(CURVES)))


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  _define_flags()
  app.run(main)
