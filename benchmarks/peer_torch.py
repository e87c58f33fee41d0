"""The DenseCL and MoCo-v2 training step in plain PyTorch, timed against the JAX step.

    python benchmarks/peer_torch.py                   # CPU default: ResNet-18/96, batch 64
    python benchmarks/peer_torch.py --models=resnet50 --sizes=224 --batch=128 \
        --dtypes=bfloat16 --repeats=5 --iters=10      # GPU: bf16 autocast vs JAX bf16

The PyTorch step follows the official implementation (WXinlong/DenseCL, see
shared/parity/README.md): momentum update of the key encoder with the current query
parameters, query forward, key forward under `no_grad`, argmax matching of query cells to key
cells on the L2-normalised backbone (C5) maps, materialised logits against the (D, K) queues
as they were before the step, L = (1-λ)·CE_global + λ·CE_dense (T = 0.2, λ = 0.5), enqueue of
k and of k2 (the pooled dense key), then SGD (momentum 0.9, weight decay 1e-4) on the query
encoder. MoCo-v2 is the same without the dense branch. The ResNet is torchvision's layout
written out here (torchvision is not a dependency), run channels_last; `--dtypes bfloat16`
means `torch.autocast(bfloat16)` (AMP), and float32 means float32 storage with TF32 tensor-core
math for matmuls and convolutions on GPUs, which is what JAX's default precision does there.

Both frameworks run in this one process on the same device, in interleaved rounds (JAX,
PyTorch, JAX, ...), on random inputs that stay on the device. Differences that are part of the
comparison and are printed with it:

* The JAX step includes the MoCo-v2 colour augmentation (on device, in the step); the official
  PyTorch code augments in DataLoader workers, so its step receives augmented tensors. The
  JAX augmentation alone is timed too (`aug ms`), and the ratio without it is printed.
* BatchNorm: PyTorch on one device normalises over the whole batch (one GPU of the official
  8-GPU run, without the shuffle); the JAX step is therefore run with `--bn=sync` by default.
* The queue pointer is a Python int here (the official `int(self.queue_ptr)` synchronises
  with the GPU each step), and the momentum update uses `torch._foreach_*`: the PyTorch side
  gets the obvious speed-ups a careful user would apply.
"""

from __future__ import annotations

import os
import sys

# JAX preallocates 75% of GPU memory by default, which would leave PyTorch none.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import copy  # pylint: disable=wrong-import-position
import functools  # pylint: disable=wrong-import-position
from collections.abc import Sequence  # pylint: disable=wrong-import-position
from typing import Any  # pylint: disable=wrong-import-position

from dense_ssl import extras  # pylint: disable=wrong-import-position

torch = extras.require("torch", "benchmarks/peer_torch.py")
import torch.nn.functional as F  # pylint: disable=wrong-import-position
from torch import nn  # pylint: disable=wrong-import-position

from benchmarks import common  # pylint: disable=wrong-import-position
from benchmarks import step as jax_step  # pylint: disable=wrong-import-position

METHODS = ("mocov2", "densecl")
VARIANTS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
            "resnet50": ("bottleneck", (3, 4, 6, 3)), "resnet101": ("bottleneck", (3, 4, 23, 3))}
COLUMNS = ("framework", "method", "model", "size", "dtype", "batch", "img/s", "ms/step",
           "spread", "setup s", "peak mem GB")


# ------------------------------------------------------------------------ torchvision ResNet ---


class BasicBlock(nn.Module):
  """torchvision's BasicBlock: two 3x3 convs, projection shortcut when the shape changes."""
  expansion = 1

  def __init__(self, inplanes: int, planes: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = _downsample(inplanes, planes * self.expansion, stride)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
  """torchvision's Bottleneck (v1.5: the stride sits on the 3x3 conv)."""
  expansion = 4

  def __init__(self, inplanes: int, planes: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * self.expansion)
    self.downsample = _downsample(inplanes, planes * self.expansion, stride)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return F.relu(out + (x if self.downsample is None else self.downsample(x)))


def _downsample(inplanes: int, outplanes: int, stride: int) -> nn.Module | None:
  if stride == 1 and inplanes == outplanes:
    return None
  return nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride, bias=False),
                       nn.BatchNorm2d(outplanes))


class ResNet(nn.Module):
  """torchvision's ResNet without avgpool/fc: returns the C5 map (N, C, H/32, W/32)."""

  def __init__(self, name: str):
    super().__init__()
    kind, stages = VARIANTS[name]
    block = BasicBlock if kind == "basic" else Bottleneck
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    layers, inplanes = [], 64
    for i, count in enumerate(stages):
      planes = 64 * 2 ** i
      blocks = []
      for j in range(count):
        blocks.append(block(inplanes, planes, 2 if (j == 0 and i > 0) else 1))
        inplanes = planes * block.expansion
      layers.append(nn.Sequential(*blocks))
    self.layer1, self.layer2, self.layer3, self.layer4 = layers
    self.num_features = inplanes
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
    return self.layer4(self.layer3(self.layer2(self.layer1(x))))


# ---------------------------------------------------------------------------------- necks ---


class MocoNeck(nn.Module):
  """OpenSelfSup `NonLinearNeckV1`: avgpool -> fc -> ReLU -> fc."""

  def __init__(self, in_channels: int, hidden: int, dim: int):
    super().__init__()
    self.mlp = nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(inplace=True),
                             nn.Linear(hidden, dim))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.mlp(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DenseCLNeck(nn.Module):
  """DenseCL's `DenseCLNeck` (num_grid=None): global MLP, dense 1x1-conv MLP, pooled dense."""

  def __init__(self, in_channels: int, hidden: int, dim: int):
    super().__init__()
    self.mlp = nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(inplace=True),
                             nn.Linear(hidden, dim))
    self.mlp2 = nn.Sequential(nn.Conv2d(in_channels, hidden, 1), nn.ReLU(inplace=True),
                              nn.Conv2d(hidden, dim, 1))

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pooled = self.mlp(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
    grid = self.mlp2(x)
    pooled2 = torch.flatten(F.adaptive_avg_pool2d(grid, 1), 1)
    return pooled, grid.flatten(2), pooled2  # (N, D), (N, D, S²), (N, D)


def _linear_kaiming(module: nn.Module) -> None:
  """`init_weights(init_linear='kaiming')`: only nn.Linear is re-initialised (pitfall 10)."""
  for m in module.modules():
    if isinstance(m, nn.Linear):
      nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
      nn.init.zeros_(m.bias)


# -------------------------------------------------------------------------------- the model ---


class Contrast(nn.Module):
  """MoCo-v2 or DenseCL: query/key encoders, queues, and the official `forward_train`."""

  def __init__(self, method: str, backbone: nn.Module, in_channels: int, *, queue: int,
               dim: int, hidden: int, temperature: float = 0.2, momentum: float = 0.999,
               loss_lambda: float = 0.5):
    super().__init__()
    if method not in METHODS:
      raise ValueError(f"No PyTorch peer for {method!r}; valid choices: {', '.join(METHODS)}.")
    self.method, self.temperature = method, temperature
    self.momentum, self.loss_lambda = momentum, loss_lambda
    neck_cls = DenseCLNeck if method == "densecl" else MocoNeck
    neck = neck_cls(in_channels, hidden, dim)
    _linear_kaiming(neck)
    self.encoder_q = nn.Sequential(backbone, neck)
    self.encoder_k = copy.deepcopy(self.encoder_q)
    for p in self.encoder_k.parameters():
      p.requires_grad = False
    self.register_buffer("queue", F.normalize(torch.randn(dim, queue), dim=0))
    if method == "densecl":
      self.register_buffer("queue2", F.normalize(torch.randn(dim, queue), dim=0))
    # Python ints: the official int(self.queue_ptr) would synchronise with the GPU each step.
    self.ptr = self.ptr2 = 0

  @torch.no_grad()
  def _momentum_update(self) -> None:
    k = [p for p in self.encoder_k.parameters()]
    q = [p.detach() for p in self.encoder_q.parameters()]
    torch._foreach_mul_(k, self.momentum)  # pylint: disable=protected-access
    torch._foreach_add_(k, q, alpha=1.0 - self.momentum)  # pylint: disable=protected-access

  @torch.no_grad()
  def _enqueue(self, name: str, keys: torch.Tensor) -> None:
    ptr_name = "ptr" if name == "queue" else "ptr2"
    buffer, ptr = getattr(self, name), getattr(self, ptr_name)
    n = keys.shape[0]
    buffer[:, ptr:ptr + n] = keys.T.to(buffer.dtype)
    setattr(self, ptr_name, (ptr + n) % buffer.shape[1])

  def _ce(self, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """ContrastiveHead: CE of [pos, neg] / T against label 0."""
    logits = torch.cat([pos, neg], dim=1) / self.temperature
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, labels)

  def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> torch.Tensor:
    if self.method == "mocov2":
      return self._forward_moco(im_q, im_k)
    return self._forward_densecl(im_q, im_k)

  def _forward_moco(self, im_q: torch.Tensor, im_k: torch.Tensor) -> torch.Tensor:
    q = F.normalize(self.encoder_q(im_q), dim=1)
    with torch.no_grad():
      self._momentum_update()
      k = F.normalize(self.encoder_k(im_k), dim=1)
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", q, self.queue.clone().detach())
    loss = self._ce(l_pos, l_neg)
    self._enqueue("queue", k)
    return loss

  def _forward_densecl(self, im_q: torch.Tensor, im_k: torch.Tensor) -> torch.Tensor:
    q_b = self.encoder_q[0](im_q)
    q, q_grid, _ = self.encoder_q[1](q_b)  # q2 is computed and unused (pitfall 5)
    q_b = F.normalize(q_b.flatten(2), dim=1)
    q, q_grid = F.normalize(q, dim=1), F.normalize(q_grid, dim=1)
    with torch.no_grad():
      self._momentum_update()
      k_b = self.encoder_k[0](im_k)
      k, k_grid, k2 = self.encoder_k[1](k_b)
      k_b = F.normalize(k_b.flatten(2), dim=1)
      k, k2, k_grid = F.normalize(k, dim=1), F.normalize(k2, dim=1), F.normalize(k_grid, dim=1)
    # Each query cell's positive: the most similar key cell on the backbone maps.
    sim = torch.matmul(q_b.permute(0, 2, 1), k_b)  # (N, S²_q, S²_k)
    index = sim.max(dim=2)[1]
    k_matched = torch.gather(k_grid, 2, index.unsqueeze(1).expand(-1, k_grid.size(1), -1))
    l_pos_dense = (q_grid * k_matched).sum(1).reshape(-1).unsqueeze(-1)
    q_rows = q_grid.permute(0, 2, 1).reshape(-1, q_grid.size(1))
    l_neg_dense = torch.einsum("nc,ck->nk", q_rows, self.queue2.clone().detach())
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", q, self.queue.clone().detach())
    loss = ((1.0 - self.loss_lambda) * self._ce(l_pos, l_neg) +
            self.loss_lambda * self._ce(l_pos_dense, l_neg_dense))
    self._enqueue("queue", k)
    self._enqueue("queue2", k2)
    return loss


# ---------------------------------------------------------------------------------- timing ---


class TorchStep:
  """The PyTorch training step of one configuration, ready to be timed like `JaxStep`."""

  def __init__(self, spec: jax_step.StepSpec, *, device: torch.device, warmup: int = 1,
               seed: int = 0, compile_model: bool = False):
    torch.manual_seed(seed)
    self.spec, self.device = spec, device
    if device.type == "cuda":
      torch.cuda.reset_peak_memory_stats(device)
    cfg = spec.config()
    with common.Stopwatch() as watch:
      backbone = ResNet(spec.model)
      model = Contrast(spec.method, backbone, backbone.num_features, queue=spec.queue,
                       dim=cfg.method.dim,
                       hidden=cfg.method.hidden, temperature=cfg.method.temperature,
                       momentum=cfg.method.momentum,
                       loss_lambda=cfg.method.get("loss_lambda", 0.5))
      self.model = model.to(device).to(memory_format=torch.channels_last)
      self.forward = torch.compile(self.model) if compile_model else self.model
      o = cfg.optim
      self.opt = torch.optim.SGD(self.model.encoder_q.parameters(), lr=o.lr,
                                 momentum=o.momentum, weight_decay=o.weight_decay)
      shape = (spec.batch, 3, spec.size, spec.size)
      self.im_q = torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last)
      self.im_k = torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last)
      self.amp = spec.dtype == "bfloat16"
      self.loss = float("nan")
      for _ in range(max(warmup, 1)):
        self.loss = float(self._steps(1))
    self.setup_s = watch.seconds
    if device.type == "cuda":
      self.memory = float(torch.cuda.max_memory_allocated(device))
      self.memory_label = "torch.cuda.max_memory_allocated"
    else:
      self.memory = float(common.rss_high_water_bytes())
      self.memory_label = "process RSS high-water (fallback)"

  def _sync(self) -> None:
    if self.device.type == "cuda":
      torch.cuda.synchronize(self.device)

  def _steps(self, iters: int) -> torch.Tensor:
    loss = torch.zeros(())
    for _ in range(iters):
      with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
        loss = self.forward(self.im_q, self.im_k)
      self.opt.zero_grad(set_to_none=True)
      loss.backward()
      self.opt.step()
    self._sync()
    return loss.detach()

  def run_round(self, iters: int) -> float:
    with common.Stopwatch() as watch:
      self._steps(iters)
    return watch.seconds


def _row(framework: str, spec: jax_step.StepSpec, times: Sequence[float], iters: int,
         setup_s: float, memory: float) -> dict[str, Any]:
  sec = common.median(times) / iters
  return {"framework": framework, "method": spec.method, "model": spec.model, "size": spec.size,
          "dtype": spec.dtype, "batch": spec.batch, "img/s": spec.batch / sec,
          "ms/step": 1e3 * sec, "spread": common.spread(times), "setup s": setup_s,
          "peak mem GB": memory / 1e9, "times": list(times)}


def compare(spec: jax_step.StepSpec, *, device: torch.device, repeats: int, iters: int,
            warmup: int = 1, aug_breakdown: bool = True,
            compile_model: bool = False) -> dict[str, Any]:
  """Times the JAX and the PyTorch step of `spec` in interleaved rounds."""
  jax_side = jax_step.JaxStep(spec, warmup=warmup)
  torch_side = TorchStep(spec, device=device, warmup=warmup, compile_model=compile_model)
  times = common.interleave({"jax": functools.partial(jax_side.run_round, iters),
                             "torch": functools.partial(torch_side.run_round, iters)}, repeats)
  rows = [_row("jax", spec, times["jax"], iters, jax_side.setup_s, jax_side.memory),
          _row("pytorch", spec, times["torch"], iters, torch_side.setup_s, torch_side.memory)]
  paired = [t / j for j, t in zip(times["jax"], times["torch"])]
  out = {"spec": spec, "rows": rows, "ratio": common.median(paired),
         "aug_ms": float("nan"), "ratio_without_aug": float("nan"),
         "jax_loss": jax_side.loss, "torch_loss": torch_side.loss}
  del jax_side, torch_side
  if aug_breakdown:
    aug_s = jax_step.augment_seconds(spec, repeats=repeats)
    jax_s = common.median(times["jax"]) / iters
    torch_s = common.median(times["torch"]) / iters
    out["aug_ms"] = 1e3 * aug_s
    out["ratio_without_aug"] = torch_s / max(jax_s - aug_s, 1e-12)
  return out


# ---------------------------------------------------------------------------------- main ---


def parse_args(argv: Sequence[str] | None, accelerator: bool) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--methods", default=",".join(METHODS), help="comma list of mocov2, densecl")
  p.add_argument("--models", default="resnet50" if accelerator else "resnet18")
  p.add_argument("--sizes", default="224" if accelerator else "96")
  p.add_argument("--batch", type=int, default=128 if accelerator else 64)
  p.add_argument("--dtypes", default="bfloat16" if accelerator else "float32",
                 help="float32 | bfloat16 (PyTorch: autocast)")
  p.add_argument("--repeats", type=int, default=5 if accelerator else 3)
  p.add_argument("--iters", type=int, default=10 if accelerator else 1)
  # Three on CPU too: with one, whichever method a process timed first ran 1.4-1.6x slower in
  # both frameworks (RESULTS.md, section 2; the cause was not pinned down).
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--queue", type=int, default=65536)
  p.add_argument("--hidden", type=int, default=None, help="neck hidden width (paper: 2048)")
  p.add_argument("--dim", type=int, default=None, help="embedding dim (paper: 128)")
  p.add_argument("--bn", default="sync", choices=("shuffle", "sync", "none"),
                 help="the JAX step's BatchNorm (sync = whole batch, as PyTorch on one device)")
  p.add_argument("--aug_breakdown", action=argparse.BooleanOptionalAction, default=True,
                 help="also time the JAX on-device augmentation alone")
  p.add_argument("--torch_compile", action="store_true", help="wrap the model in torch.compile")
  p.add_argument("--threads", type=int, default=common.cpu_cores(),
                 help="torch.set_num_threads (default: the cores this process may use)")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """Runs every configuration; prints the table and `JAX/PyTorch` lines; returns the results."""
  import jax  # pylint: disable=g-import-not-at-top
  accelerator = jax.devices()[0].platform != "cpu"
  args = parse_args(argv, accelerator)
  torch.set_num_threads(args.threads)
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  if device.type == "cuda":
    torch.backends.cudnn.benchmark = True
    # JAX computes float32 matmuls/convs with TF32 on Ampere+ by default; match it.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
  print(common.machine_header(jax.devices()))
  print(f"# torch {torch.__version__} on {device} ({args.threads} threads); JAX BatchNorm "
        f"{args.bn}; queue {args.queue}; {args.repeats} rounds x {args.iters} steps")
  results = []
  for model in common.parse_list(args.models):
    for size in common.parse_list(args.sizes, int):
      for dtype in common.parse_list(args.dtypes):
        for method in common.parse_list(args.methods):
          if method not in METHODS:
            raise SystemExit(f"--methods: {method!r} has no PyTorch peer; use "
                             f"{', '.join(METHODS)}.")
          spec = jax_step.StepSpec(method=method, model=model, size=size, batch=args.batch,
                                   dtype=dtype, queue=args.queue, bn=args.bn, bn_groups=1,
                                   hidden=args.hidden, dim=args.dim)
          print(f"# {method} on {spec.label} ...", flush=True)
          results.append(compare(spec, device=device, repeats=args.repeats, iters=args.iters,
                                 warmup=args.warmup, aug_breakdown=args.aug_breakdown,
                                 compile_model=args.torch_compile))
  print(common.table([row for r in results for row in r["rows"]], COLUMNS))
  print("# JAX includes its on-device colour augmentation; PyTorch receives augmented inputs. "
        "setup s: all before steady state (JAX: state init, compile, warm-up; PyTorch: model, "
        "warm-up).")
  for r in results:
    label = common.METHOD_LABELS[r["spec"].method]
    print(f"JAX/PyTorch throughput {label} {r['spec'].label} = {common.fmt(r['ratio'])} "
          f"(without JAX augmentation {common.fmt(r['ratio_without_aug'])}; "
          f"aug {common.fmt(r['aug_ms'])} ms/step)")
  return results


if __name__ == "__main__":
  main()
