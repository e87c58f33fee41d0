"""Smoke tests of the benchmark scripts: each `main()` runs with the tiniest settings.

No timing thresholds (timed tests are forbidden here): the tests check that every script
prints its table and its ratio lines and that the numbers are positive and finite. ResNet-18 at
64 px, batch 8, a 64-entry queue and narrow necks keep each step small; the session's persistent
compilation cache (conftest.py) lets later scripts load the steps that earlier ones compiled
(the same configuration compiles to the same executable).
"""

import ast
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from benchmarks import common
from benchmarks import step

# Every test uses whole-batch BatchNorm, so the step compiled by the first test is reused (from
# the cache) by the PyTorch and data tests, whose JAX side runs --bn=sync.
TINY = ["--models=resnet18", "--sizes=64", "--batch=8", "--queue=64", "--hidden=64", "--dim=16",
        "--dtypes=float32", "--warmup=1", "--iters=1", "--bn=sync"]
NUMBER = r"([-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?|n/a)"


def _positive(value):
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _table_rows(text, first_column_values):
  """The markdown table rows whose first cell is one of `first_column_values`."""
  rows = []
  for line in text.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if line.startswith("|") and cells[0] in first_column_values:
      rows.append(cells)
  return rows


def test_fallback_config_matches_the_project_configs():
  pytest.importorskip("ml_collections")
  for method in step.METHODS:
    real, source = common.project_config(method)
    assert source == f"configs/{method}.py"
    assert common.fallback_config(method).to_dict() == real.to_dict(), (
        f"configs/{method}.py changed: update benchmarks/common.py:fallback_config, which "
        f"machines without ml_collections use")


def test_attrdict_behaves_like_a_config():
  c = common.AttrDict(method=dict(name="densecl", queue_size=64))
  assert c.method.name == "densecl" and "queue_size" in c.method
  assert c.method.get("momentum", 0.0) == 0.0
  with pytest.raises(AttributeError, match="no field"):
    c.method.queue_sise = 3  # a typo fails loudly, as in a locked ConfigDict


def test_fit_bn_groups():
  assert common.fit_bn_groups(8, 256, 1) == 8
  assert common.fit_bn_groups(8, 12, 1) == 6
  assert common.fit_bn_groups(8, 8, 8) == 8
  with pytest.raises(ValueError):
    common.fit_bn_groups(8, 4, 8)


def test_step_prints_table_and_ratios(capsys):
  # HoughCL differs from DenseCL only in its matcher; the ratio code is checked with it below.
  out = step.main(TINY + ["--methods=mocov2,densecl", "--repeats=2", "--devices=1"])
  text = capsys.readouterr().out
  assert len(_table_rows(text, step.METHODS)) == 2
  for row in out["rows"]:
    for key in ("img/s", "ms/step", "compile s", "GFLOP/img", "XLA mem GB", "peak mem GB"):
      assert _positive(row[key]), (row["method"], key, row[key])
    assert math.isfinite(row["spread"]) and row["spread"] >= 0
    assert math.isnan(row["MFU"])  # CPU: no peak FLOP/s, no MFU
  (ratio,) = out["ratios"]
  assert ratio["method"] == "densecl" and _positive(ratio["time_ratio"])
  # The dense neck and the dense logits add FLOPs to MoCo-v2's; counted with the logits
  # materialised although the step ran the chunked loss (the default).
  assert out["rows"][1]["spec"].dense_chunk > 0
  assert ratio["flop_ratio"] > 1.0
  assert re.search(r"^DenseCL/MoCo-v2 step time " + NUMBER + r" .* model FLOP ratio " + NUMBER,
                   text, re.M)
  last = text.strip().splitlines()[-1]
  match = re.fullmatch(r"DenseCL/MoCo-v2 = " + NUMBER, last)
  assert match and _positive(float(match.group(1))), last


def test_dense_loss_chunked_equals_materialised_with_less_memory(capsys):
  from benchmarks import dense_loss  # pylint: disable=g-import-not-at-top
  # 8 images x 4x4 cells against a 4000-row queue; 96 does not divide 4000 (padded last chunk).
  rows = dense_loss.main(["--batch=8", "--chunks=96", "--grid=4", "--queue=4000", "--dim=16",
                          "--repeats=1", "--iters=1"])
  text = capsys.readouterr().out
  plain, chunked = rows
  assert (plain["chunk"], chunked["chunk"]) == ("none", 96) and plain["rows"] == 128
  assert chunked["max rel diff"] < 1e-5
  assert all(_positive(r["ms"]) and _positive(r["compile s"]) for r in rows)
  # XLA's temporaries: (128, 4000) logits and their gradient vs a (128, 96) chunk at a time
  # (plus the zero-padded copy of the queue).
  assert chunked["temp"] < plain["temp"] / 4
  assert re.search(r"^batch 8 \(128 rows x 4000\): chunk 96 / materialised: time " + NUMBER +
                   r", temp memory " + NUMBER, text, re.M)


def test_heads_time_what_the_dense_methods_add_to_mocov2(capsys):
  from benchmarks import heads  # pylint: disable=g-import-not-at-top
  batch, grid, c, h, d, k = 2, 7, 64, 64, 16, 1000
  rows = heads.main([f"--batch={batch}", f"--grid={grid}", f"--channels={c}", f"--hidden={h}",
                     f"--dim={d}", f"--queue={k}", "--chunk=96", "--repeats=2",
                     "--step_ms=1000"])
  text = capsys.readouterr().out
  assert [r["head"] for r in rows] == ["mocov2", "densecl", "houghcl"]
  assert all(_positive(r["ms"]) and _positive(r["GFLOP"]) for r in rows)
  # The dense extra, as matmuls: the dense neck's two 1x1 convs on N·S² cells three times for
  # the query (forward, input and weight gradients) and once for the key, and the dense logits
  # against the queue twice (forward, gradient wrt q). XLA adds elementwise work on top.
  cells = batch * grid * grid
  matmuls = 4 * 2 * cells * (c * h + h * d) + 2 * 2 * cells * k * d
  for r in rows[1:]:
    assert matmuls <= r["flops"] - rows[0]["flops"] <= 1.5 * matmuls
    assert re.search(rf"^{r['head']} head - mocov2 head: {NUMBER} ms, {NUMBER} GFLOP "
                     rf"\({NUMBER} GFLOP/s\); with a 1000 ms MoCo-v2 step: step ratio {NUMBER}$",
                     text, re.M)


def test_vit_sparse_student_and_local_crops_cost_in_proportion_to_their_tokens(capsys):
  from benchmarks import vit  # pylint: disable=g-import-not-at-top
  results = vit.main(["--model=vit_micro8", "--size=64", "--local_size=32", "--batch=2",
                      "--repeats=1", "--iters=1", "--no_step"])
  text = capsys.readouterr().out
  # 64 patch tokens, 16 kept (+ cls): 17/65 = 0.262; a 32 px crop: 17 tokens too.
  match = re.search(rf"^DILEMMA/dense student fwd\+bwd: time {NUMBER}, XLA FLOPs {NUMBER}, "
                    r"tokens 0.262$", text, re.M)
  assert match, text
  assert 0.15 < float(match[2]) < 0.35  # linear layers scale with tokens, attention faster
  assert re.search(rf"^DINO local/global crop fwd\+bwd \(32/64 px\): time {NUMBER}, XLA FLOPs "
                   rf"{NUMBER}, tokens 0.262$", text, re.M), text
  assert set(results) == {"DILEMMA/dense student fwd+bwd",
                          "DINO local/global crop fwd+bwd (32/64 px)"}


def test_backbone_compares_xla_defaults_with_the_cpu_options_and_gradients(capsys):
  from benchmarks import backbone  # pylint: disable=g-import-not-at-top
  rows = backbone.main(["--specs=resnet18/64/2", "--repeats=1"])
  text = capsys.readouterr().out
  assert [r["variant"] for r in rows] == ["XLA's defaults", "options", "ours"]
  assert all(_positive(r["fwd ms"]) and _positive(r["fwd+bwd ms"]) for r in rows)
  for variant in ("options", "ours"):
    for label in ("fwd", r"fwd\+bwd"):
      assert re.search(rf"^resnet18/64 batch 2: {label} time, XLA's defaults / {variant} = " +
                       NUMBER + "$", text, re.M)


def _fake_row(method, model, size, times, flops):
  spec = step.StepSpec(method, model=model, size=size)
  return {"spec": spec, "times": times, "flops": flops}


def test_ratios_pair_interleaved_rounds_and_pick_the_headline():
  rows = [_fake_row("mocov2", "resnet18", 96, [1.0, 2.0], 10.0),
          _fake_row("densecl", "resnet18", 96, [1.5, 2.0], 12.0),
          _fake_row("houghcl", "resnet18", 96, [1.2, 2.4], 12.0),
          _fake_row("mocov2", "resnet50", 224, [4.0, 4.0], 30.0),
          _fake_row("densecl", "resnet50", 224, [4.4, 4.8], 33.0)]
  out = step.ratios(rows)
  by = {(r["method"], r["group"].model): r for r in out if r["base"] == "mocov2"}
  assert by["densecl", "resnet18"]["time_ratio"] == pytest.approx(1.25)  # median(1.5, 1.0)
  assert by["houghcl", "resnet18"]["time_ratio"] == pytest.approx(1.2)
  assert by["houghcl", "resnet18"]["flop_ratio"] == pytest.approx(1.2)
  # HoughCL is also paired with DenseCL, its real baseline: median(0.8, 1.2) = 1.0.
  (hough_dense,) = [r for r in out if r["method"] == "houghcl" and r["base"] == "densecl"]
  assert hough_dense["time_ratio"] == pytest.approx(1.0)
  best = step.headline(out)
  assert best["group"].model == "resnet50"
  assert best["time_ratio"] == pytest.approx(1.15) and best["flop_ratio"] == pytest.approx(1.1)
  assert "HoughCL/MoCo-v2 step time 1.20" in step.ratio_line(by["houghcl", "resnet18"])
  assert "HoughCL/DenseCL step time 1.00" in step.ratio_line(hough_dense)


def test_step_scaling_one_vs_eight_devices(capsys):
  assert jax.device_count() >= 8, "conftest.py provides 8 fake CPU devices"
  out = step.main(TINY + ["--scaling", "--methods=densecl", "--repeats=1", "--devices=8"])
  text = capsys.readouterr().out
  rows = out["rows"]
  assert [r["dev"] for r in rows] == [1, 8]
  assert all(_positive(r["img/s"]) and _positive(r["speed-up"]) for r in rows)
  assert re.fullmatch(r"speed-up 8 vs 1 devices = " + NUMBER, text.strip().splitlines()[-1])


def test_peer_torch_prints_jax_over_pytorch(capsys):
  pytest.importorskip("torch")
  from benchmarks import peer_torch  # pylint: disable=g-import-not-at-top
  results = peer_torch.main(TINY + ["--methods=mocov2,densecl", "--repeats=1",
                                    "--no-aug_breakdown", "--threads=2"])
  text = capsys.readouterr().out
  assert len(_table_rows(text, ("jax", "pytorch"))) == 4
  for r in results:
    assert _positive(r["ratio"])
    assert math.isfinite(r["jax_loss"]) and math.isfinite(r["torch_loss"])
    assert all(_positive(row["img/s"]) for row in r["rows"])
  lines = re.findall(r"^JAX/PyTorch throughput (\S+) .* = " + NUMBER, text, re.M)
  assert [m[0] for m in lines] == ["MoCo-v2", "DenseCL"]
  assert all(_positive(float(m[1])) for m in lines)


def _rel(a, ref):
  a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
  return np.abs(a - ref).max() / np.abs(ref).max()


def _parity_model(method, r):
  """peer_torch's model on case A: identity backbone, neck and queues from the vectors."""
  import torch  # pylint: disable=g-import-not-at-top
  from benchmarks import peer_torch  # pylint: disable=g-import-not-at-top
  channels = r["in/q_backbone"].shape[-1]
  hidden = r["in/neck_q/global_fc1/kernel"].shape[1]
  dim = r["in/neck_q/global_fc2/kernel"].shape[1]
  queue = r["in/queue_global"].shape[0]
  model = peer_torch.Contrast(method, torch.nn.Identity(), channels, queue=queue, dim=dim,
                              hidden=hidden, temperature=float(r["in/temperature"]),
                              momentum=float(r["in/momentum"]),
                              loss_lambda=float(r["in/loss_lambda"]))
  t = lambda x: torch.from_numpy(np.ascontiguousarray(x, np.float32))
  for side, encoder in (("q", model.encoder_q), ("k", model.encoder_k)):
    neck, p = encoder[1], f"in/neck_{side}/"
    layers = [(neck.mlp[0], "global_fc1"), (neck.mlp[2], "global_fc2")]
    if method == "densecl":
      layers += [(neck.mlp2[0], "dense_conv1"), (neck.mlp2[2], "dense_conv2")]
    with torch.no_grad():
      for layer, name in layers:
        kernel = r[p + name + "/kernel"]
        weight = kernel.T if kernel.ndim == 2 else kernel[0, 0].T[:, :, None, None]
        layer.weight.copy_(t(weight))
        layer.bias.copy_(t(r[p + name + "/bias"]))
  with torch.no_grad():
    if method == "densecl":
      model.queue.copy_(t(r["in/queue_global"].T))
      model.queue2.copy_(t(r["in/queue_dense"].T))
      model.ptr, model.ptr2 = int(r["in/queue_global_ptr"]), int(r["in/queue_dense_ptr"])
    else:
      model.queue.copy_(t(r["mocov2/in/queue"].T))
      model.ptr = int(r["mocov2/in/queue_ptr"])
  return model, t


@pytest.mark.parametrize("method", ["densecl", "mocov2"])
def test_peer_torch_step_matches_the_parity_vectors(method):
  """The PyTorch peer is the official step: loss, gradients, queues, momentum update."""
  pytest.importorskip("torch")
  r = np.load(os.path.join(os.path.dirname(__file__), "data", "parity", "densecl_A.npz"))
  model, t = _parity_model(method, r)
  x_q = t(r["in/q_backbone"].transpose(0, 3, 1, 2)).requires_grad_(True)
  x_k = t(r["in/k_backbone"].transpose(0, 3, 1, 2))
  loss = model(x_q, x_k)
  loss.backward()
  neck_q, neck_k = model.encoder_q[1], model.encoder_k[1]
  if method == "densecl":
    assert _rel(loss.item(), r["out/loss_total"]) < 1e-5
    assert _rel(model.queue.T, r["out/queue_global"]) < 1e-5
    assert _rel(model.queue2.T, r["out/queue_dense"]) < 1e-5
    assert (model.ptr, model.ptr2) == (int(r["out/queue_global_ptr"]),
                                       int(r["out/queue_dense_ptr"]))
    assert _rel(neck_k.mlp2[0].weight.detach()[:, :, 0, 0].T,
                r["out/neck_k_updated/dense_conv1/kernel"][0, 0]) < 1e-6
    assert _rel(neck_q.mlp2[2].weight.grad[:, :, 0, 0].T,
                r["grad/neck_q/dense_conv2/kernel"][0, 0]) < 1e-4
    assert _rel(neck_q.mlp[0].weight.grad.T, r["grad/neck_q/global_fc1/kernel"]) < 1e-4
    assert _rel(x_q.grad.permute(0, 2, 3, 1), r["grad/q_backbone"]) < 1e-4
  else:
    assert _rel(loss.item(), r["mocov2/out/loss"]) < 1e-5
    assert _rel(model.queue.T, r["mocov2/out/queue"]) < 1e-5
    assert model.ptr == int(r["mocov2/out/queue_ptr"])
    assert _rel(neck_k.mlp[0].weight.detach().T,
                r["out/neck_k_updated/global_fc1/kernel"]) < 1e-6
    assert _rel(neck_q.mlp[2].weight.grad.T, r["mocov2/grad/neck_q/fc2/kernel"]) < 1e-4
    assert _rel(x_q.grad.permute(0, 2, 3, 1), r["mocov2/grad/q_backbone"]) < 1e-4


def test_data_pipeline_vs_step(capsys):
  pytest.importorskip("tensorflow")
  from benchmarks import data  # pylint: disable=g-import-not-at-top
  out = data.main(["--size=64", "--batch=8", "--batches=2", "--repeats=1", "--num_jpegs=8",
                   "--threads=1,0", "--model=resnet18", "--method=densecl", "--queue=64",
                   "--hidden=64", "--dim=16", "--step_repeats=1", "--end_to_end"])
  text = capsys.readouterr().out
  assert len(_table_rows(text, ("demo", "folder"))) == 4
  for row in out["pipeline"]:
    assert _positive(row["pairs/s"]) and _positive(row["pairs/s/core"])
  assert _positive(out["step"]) and _positive(out["end_to_end"])
  verdicts = re.findall(r"bottleneck: (pipeline|step); cores needed to feed the step: " + NUMBER,
                        text)
  assert len(verdicts) == 4 and all(_positive(float(v[1])) for v in verdicts)


DEVICE_CHECK = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks",
                            "device_check.sh")
# What the lent GPU machine lacks (benchmarks/device_check.sh runs these test modules there).
_NOT_ON_THE_GPU_MACHINE = ("tensorflow", "tensorflow_datasets", "ml_collections", "clu",
                           "dense_ssl.data", "dense_ssl.main", "dense_ssl.train", "configs")


def _device_check(tmp_path, **env):
  full_env = {k: v for k, v in os.environ.items() if k not in ("PARTS", "BUDGET", "SMOKE")}
  full_env.update(OUT=str(tmp_path), PYTHON=sys.executable, **env)
  return subprocess.run(["bash", DEVICE_CHECK], capture_output=True, text=True, env=full_env,
                        timeout=240, check=False)


def test_device_check_commands_parse_and_its_tests_need_no_tensorflow(tmp_path):
  """The dry run's commands are valid for the scripts they call, in order of value."""
  result = _device_check(tmp_path, DRY_RUN="1")
  assert result.returncode == 0, result.stderr
  parts = re.findall(r"^\+ \[(\w+) (\d+)s\] (.*)$", result.stdout, re.M)
  names = [p[0] for p in parts]
  # "tests" runs in the background, so its line may come anywhere.
  assert [n for n in names if n != "tests"] == ["env", "step_bf16", "peer", "curve", "curve",
                                                "step_f32"], names
  assert names.count("tests") == 1
  assert sum(int(p[1]) for p in parts if p[0] != "tests") > 540  # more asked than the budget
  from benchmarks import peer_torch  # pylint: disable=g-import-not-at-top
  batches = []
  for name, _, command in parts:
    argv = command.split()
    if name in ("step_bf16", "curve", "step_f32"):
      assert argv[1] == "benchmarks/step.py"
      args = step.parse_args(argv[2:])
      assert (args.models, args.sizes) == ("resnet50", "224")
      batches.append(args.batch)
    elif name == "peer":
      assert argv[1] == "benchmarks/peer_torch.py"
      args = peer_torch.parse_args(argv[2:], accelerator=True)
      assert (args.batch, args.dtypes) == (256, "bfloat16")
    elif name == "tests":
      modules = [a for a in argv if a.startswith("tests/")]
      assert modules
      for module in modules:
        path = os.path.join(os.path.dirname(DEVICE_CHECK), "..", module)
        tree = ast.parse(open(path).read())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree)
                     if isinstance(n, ast.ImportFrom) and n.module}
        bad = [m for m in imported if m.split(".")[0] in _NOT_ON_THE_GPU_MACHINE
               or m.startswith(_NOT_ON_THE_GPU_MACHINE)]
        assert not bad, f"{module} imports {bad}, which the GPU machine does not have"
  assert sorted(batches) == [64, 256, 256, 1024]  # the batch curve 64 -> 256 -> 1024


def test_device_check_runs_parts_within_its_budget(tmp_path):
  ran = _device_check(tmp_path / "a", PARTS="env", BUDGET="200")
  assert ran.returncode == 0, ran.stderr
  summary = (tmp_path / "a" / "summary.txt").read_text().splitlines()
  assert len(summary) == 1 and re.match(r"env +rc=0 ", summary[0]), summary
  env_log = (tmp_path / "a" / "env.log").read_text()
  assert f"jax {jax.__version__}" in env_log and "ALL PASS" in env_log
  assert "ALL PASS" in ran.stdout  # the pasted lines end the output
  spent = _device_check(tmp_path / "b", PARTS="env,step_bf16", BUDGET="20")
  assert spent.returncode == 0, spent.stderr
  assert (tmp_path / "b" / "summary.txt").read_text().splitlines() == [
      "env          skipped (budget spent)", "step_bf16    skipped (budget spent)"]


def test_machine_header_names_the_cpu_and_its_vector_isa():
  header = common.machine_header(jax.devices())
  model = common.cpu_model()
  assert model and f"CPU cores ({model})" in header
  flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
  if re.search(r"^flags\s*:.*\bavx512f\b", flags, re.M):
    assert model.endswith("AVX-512")
  elif re.search(r"^flags\s*:.*\bavx2\b", flags, re.M):
    assert model.endswith("AVX2")


def test_bn_floor_reads_a_random_init_with_running_and_with_batch_statistics():
  """A random init's running statistics are 0 / 1, so eval-mode BN leaves its activations
  un-normalised; batch statistics normalise them: the two readings see different features."""
  from benchmarks import bn_floor
  from dense_ssl.data import scenes
  backbone, variables = bn_floor.backbone_and_variables("random", "resnet18", seed=0)
  images, labels = scenes.single_garments("probe_train", size=64, n=30)
  running = np.asarray(bn_floor.pooled(variables, images, backbone=backbone,
                                       batch_statistics=False))
  normalised = np.asarray(bn_floor.pooled(variables, images, backbone=backbone,
                                          batch_statistics=True))
  assert running.shape == normalised.shape == (30, 512)
  assert np.all(np.isfinite(running)) and np.all(np.isfinite(normalised))
  stats = jax.tree_util.tree_leaves_with_path(variables["batch_stats"])
  assert stats and all(np.all(np.asarray(v) == (0.0 if "mean" in jax.tree_util.keystr(k)
                                                 else 1.0)) for k, v in stats)
  assert np.linalg.norm(running - normalised) > 0.1 * np.linalg.norm(normalised)
  top1 = bn_floor.knn_top1(variables, backbone, (images[:20], labels[:20], images[20:],
                                                 labels[20:]), batch_statistics=True)
  assert top1 * 10 == round(top1 * 10)  # a fraction of the 10 test garments
