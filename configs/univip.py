"""UniVIP (Li et al., CVPR 2022): BYOL with scene-instance and instance-instance terms.

    python -m dense_ssl.data.proposals --config=configs/univip.py       # once: selective search
    python -m dense_ssl.main --config=configs/univip.py --workdir=runs/univip     # COCO recipe
    python -m dense_ssl.main --config=configs/univip.py:test --workdir=runs/t     # tiny, no cv2

Default = the COCO recipe: ResNet-50, COCO train2017, batch 512, 800 epochs, 4 warm-up epochs,
BYOL's LARS (lr 0.2 x batch/256, wd 1.5e-6, biases and BN excluded), heads and EMA (0.99 -> 1),
two 224 crops whose overlap holds K = 4 selective-search proposals (ORL-filtered: IoU <= 0.5,
aspect ratio in [1/3, 3], sides >= 64 px), instances at 96 px, Sinkhorn ε = 0.1 with 50
iterations. The proposals are computed once by `python -m dense_ssl.data.proposals` (needs
OpenCV contrib: the `opencv-contrib-python-headless` package) into a sidecar next to the data.
Variants: `imagenet` (ImageNet, 200 epochs, batch 4096, 10 warm-up epochs), `demo` (embedded
photos, ResNet-18/128, instances 64 px; run the proposals command first), `test` (tiny, on
Fashion-MNIST scenes with their garments' boxes as proposals), `fmnist_scenes` (the benchmark
protocol; garment boxes, or `--config.data.proposals=selective_search` after the command).
"""

from configs import byol, common


def proposals(c, kind="selective_search", min_side=64):
  c.data.proposals = kind  # "selective_search" (the sidecar) | "garments" (fmnist_scenes)
  c.data.proposals_path = ""  # "" = next to the dataset (dense_ssl/data/proposals.py)
  c.data.proposal_min_side = float(min_side)  # pixels of the original image


def imagenet(c):
  c.data.update(common.IMAGENET)
  c.batch_size = 4096
  c.total_epochs = 200.0
  c.optim.warmup_epochs = 10.0


def demo(c):
  byol.demo(c)
  c.method.instance_size = 64
  c.data.proposal_min_side = 32.0  # demo photos are 48-512 px


def test(c):
  byol.test(c)
  c.data.update(dict(source="fmnist_scenes", scenes_num_images=64, proposals="garments",
                     proposal_min_side=12.0))
  c.method.update(dict(instance_size=32, num_instances=2))


def fmnist_scenes(c):
  byol.fmnist_scenes(c)
  c.data.update(dict(proposals="garments", proposal_min_side=12.0))  # garments: 24-48 px
  # 2-5 garments per scene: K = 2 of them fit in most crop overlaps (K = 4 in few).
  c.method.update(dict(instance_size=32, num_instances=2))


def get_config(arg=None):
  c = common.base_config()
  c.batch_size = 512
  c.total_epochs = 800.0
  byol.byol_recipe(c, "univip", num_instances=4, instance_size=96, sinkhorn_eps=0.1,
                   sinkhorn_iters=50)
  c.data.source = "coco2017"
  c.optim.warmup_epochs = 4.0
  proposals(c)
  return common.apply_variant(c, arg, {"default": None, "imagenet": imagenet, "demo": demo,
                                       "test": test, "fmnist_scenes": fmnist_scenes})
