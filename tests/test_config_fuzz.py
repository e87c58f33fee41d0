"""Fuzzing the config: random overrides of the `test` variant train or fail with one clear line.

Each case draws a method and a few overrides from values a user might type, valid or not, and
runs the real trainer for 2 steps on the embedded photos (8 fake CPU devices). It must either
finish, or raise a ValueError/FileNotFoundError whose message is one line that names a
`config.` key, before anything is compiled or checkpointed; never a traceback from inside JAX.

The draw is seeded; DENSE_SSL_FUZZ_CASES / DENSE_SSL_FUZZ_SEED widen it locally. Each case that
passes the checks compiles a training step (a minute on 2 CPU cores), so CI trains a few only.
"""

import os
import random

import jax
import pytest

from dense_ssl import config_errors, train

# Values a user might type for each key; the wrong ones are the point.
CHOICES = {
    "batch_size": [8, 12, 16, 32],
    "method.queue_size": [32, 48, 64, 128],
    "method.bn": ["shuffle", "sync", "none", "group"],
    "method.bn_groups": [0, 1, 4, 8, 16],
    "method.momentum_schedule": ["constant", "cosine", "linear"],
    "data.image_size": [32, 48, 64, 96],
    "model.name": ["resnet18", "resnet34", "resnet5", "vit_micro8"],
    "optim.name": ["sgd", "lars", "adamw", "adam"],
    "optim.schedule": ["cosine", "constant", "step"],
    "optim.warmup_epochs": [0.0, 1.0],
    "nan_policy": ["stop", "skip_step", "ignore"],
    "data.source": ["demo", "synthetic", "imagenet"],
    "evals": [{}, {"probe": {"type": "linaer"}}, {"knn": {"k": 5, "kk": 1}}],
}
METHODS = ["mocov2", "densecl", "houghcl"]
NUM_CASES = int(os.environ.get("DENSE_SSL_FUZZ_CASES", "10"))
SEED = int(os.environ.get("DENSE_SSL_FUZZ_SEED", "0"))
MAX_TRAINED = int(os.environ.get("DENSE_SSL_FUZZ_TRAIN", "3"))


def draw_cases(num: int, seed: int) -> list[tuple[str, dict]]:
  rng = random.Random(seed)
  cases = []
  for _ in range(num):
    keys = rng.sample(sorted(CHOICES), k=3)
    cases.append((rng.choice(METHODS), {k: rng.choice(CHOICES[k]) for k in keys}))
  return cases


def make_config(method: str, overrides: dict):
  config = config_errors.load_config(f"configs/{method}.py:test")
  return config_errors.override(config, {"total_steps": 2, "checkpoint_every_steps": 2,
                                         **overrides})


def _is_clear(error: BaseException) -> bool:
  message = str(error)
  return (isinstance(error, (ValueError, FileNotFoundError)) and "\n" not in message.strip()
          and "config." in message)


_trained = []


@pytest.mark.parametrize("method,overrides", draw_cases(NUM_CASES, SEED),
                         ids=lambda x: x if isinstance(x, str) else
                         ",".join(f"{k}={v}" for k, v in x.items()))
def test_random_overrides_train_or_fail_clearly(method, overrides, tmp_path):
  config = make_config(method, overrides)
  try:
    train.check_config(config, jax.device_count(), jax.process_count())
  except Exception as e:  # pylint: disable=broad-except
    assert _is_clear(e), f"{type(e).__name__}: {e}"
    return
  if len(_trained) >= MAX_TRAINED:
    pytest.skip(f"passes the checks; only {MAX_TRAINED} cases train per run (compile time)")
  _trained.append(overrides)
  try:
    state = train.run(config, str(tmp_path))
  except Exception as e:  # pylint: disable=broad-except
    assert _is_clear(e), f"{type(e).__name__}: {e}"
    assert not os.path.exists(tmp_path / "checkpoints" / "2"), "failed after checkpointing"
    return
  assert int(state.step) == 2
