"""DenseCL (Wang et al., CVPR 2021): MoCo-v2 plus a dense contrastive head.

    python -m dense_ssl.main --config=configs/densecl.py --workdir=runs/densecl      # ImageNet recipe
    python -m dense_ssl.main --config=configs/densecl.py:coco --workdir=runs/coco    # COCO recipe
    python -m dense_ssl.main --config=configs/densecl.py:demo --workdir=runs/demo    # CPU, minutes

Default = the official ImageNet recipe: ResNet-50, 200 epochs, batch 256, SGD lr 0.03 momentum 0.9
wd 1e-4, cosine, no warm-up, T=0.2, λ=0.5, global and dense queues of 65536, momentum 0.999,
shuffle-BN. The dense loss visits the dense queue 4096 rows at a time (`method.dense_chunk`;
0 materialises the (N·S², K) logits): same value and gradients, a fraction of the memory, and
faster (benchmarks/dense_loss.py). `coco`: COCO train2017, 800 epochs, lr 0.3. `demo`, `test`:
see configs/common.py.
"""

from configs import common


def coco(c):
  c.data.source = "coco2017"
  c.total_epochs = 800.0
  c.optim.lr = 0.3


def get_config(arg=None):
  c = common.base_config()
  c.method = common.moco_method(name="densecl", loss_lambda=0.5, dense_chunk=4096)
  return common.apply_variant(c, arg, {"default": None, "coco": coco,
                                       "demo": common.demo_overrides,
                                       "test": common.test_overrides,
                                       "fmnist_scenes": common.sgd_fmnist_scenes_overrides})
