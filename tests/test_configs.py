"""Every config file and variant loads, is locked, and bad keys/variants give one clear line."""

import glob
import os

import pytest

from dense_ssl import config_errors

CONFIGS = sorted(p for p in glob.glob("configs/*.py")
                 if os.path.basename(p) not in ("common.py", "__init__.py"))


@pytest.mark.parametrize("path", CONFIGS)
@pytest.mark.parametrize("variant", ["", "demo", "test", "fmnist_scenes"])
def test_config_variants_load_locked(path, variant):
  config = config_errors.load_config(f"{path}:{variant}" if variant else path)
  assert config.is_locked
  assert config.method.name == os.path.basename(path)[:-3]
  with pytest.raises(AttributeError):
    config.not_a_key = 1


def test_default_is_the_paper_recipe():
  c = config_errors.load_config("configs/densecl.py")
  assert (c.model.name, c.batch_size, c.total_epochs) == ("resnet50", 256, 200.0)
  assert (c.optim.name, c.optim.lr, c.optim.momentum, c.optim.weight_decay) == (
      "sgd", 0.03, 0.9, 1e-4)
  assert (c.method.temperature, c.method.queue_size, c.method.momentum,
          c.method.loss_lambda) == (0.2, 65536, 0.999, 0.5)
  coco = config_errors.load_config("configs/densecl.py:coco")
  assert (coco.total_epochs, coco.optim.lr, coco.data.source) == (800.0, 0.3, "coco2017")


def test_unknown_variant_lists_choices():
  with pytest.raises(ValueError, match="valid variants: coco, default, demo, fmnist_scenes, test"):
    config_errors.load_config("configs/densecl.py:tst")


def test_misspelt_override_is_explained():
  msg = config_errors.explain(["main", "--config=configs/mocov2.py:test",
                               "--config.optim.lrr=0.1"])
  assert msg.startswith("--config.optim.lrr: config.optim has no key 'lrr'")
  assert "lr, momentum" in msg
  assert config_errors.explain(["main", "--config=configs/mocov2.py:test",
                                "--config.optim.lr=0.1"]) is None
