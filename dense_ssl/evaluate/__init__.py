"""Evaluators by name: linear probe, k-NN, dense probe, correspondence (frozen backbones) and
full fine-tuning with layer-wise lr decay (ViTs).

    python -m dense_ssl.evaluate --workdir=W [--step=N] [--evals=linear,knn,dense,corr]

Importing the package registers every evaluator; `from_config(config.evals, backbone)` builds
them and `run_all(evaluators, state)` runs them (see base.py).
"""

from dense_ssl.evaluate import classification, correspondence, dense, finetune
from dense_ssl.evaluate.base import (DEFAULT_EVALS, create, from_config, names, register,
                                     run_all)
