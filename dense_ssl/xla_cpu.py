"""XLA compiler options for the steps of this codebase on CPU hosts.

jaxlib 0.10 hands convolutions, dots and reductions on CPU to YNNPACK by default. Measured on a
2-core AVX2 host (2026-12-01, `benchmarks/backbone.py`): YNNPACK's convolutions run at 50-110
GFLOP/s where XLA's own (Eigen) ones run at 120-175, and its weight gradients are slower still;
but XLA's own reductions (BatchNorm statistics) are 5-10x slower than YNNPACK's. Keeping
YNNPACK for dots and reductions only made a ResNet-50/224 forward pass 1.4x faster and, with
`models/conv.py`'s 1x1 weight gradients, forward + backward 1.7x faster (ResNet-18/96: 1.8x).

Pass `compiler_options()` to `jax.jit` at the places that compile a model (the train step, the
evaluators' forward pass, the benchmarks). It is None on other backends, None when XLA_FLAGS
already sets the option (the user's choice wins), and None (with a warning) when this jaxlib
does not know the option.
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import numpy as np

OPTION = "xla_cpu_experimental_ynn_fusion_type"
# XLA's DebugOptions.LibraryFusionType names; INDIVIDUAL_CONVOLUTION (a default) is left out.
YNN_FUSION_TYPES = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"


def compiler_options(backend: str | None = None) -> dict[str, str] | None:
  """`jax.jit(..., compiler_options=...)` for `backend` (default: JAX's default backend)."""
  if (backend or jax.default_backend()) != "cpu":
    return None
  if OPTION in os.environ.get("XLA_FLAGS", ""):
    return None
  return _cpu_options()


@functools.cache
def _cpu_options() -> dict[str, str] | None:
  options = {OPTION: YNN_FUSION_TYPES}
  try:  # A later jaxlib may rename or drop the option; then XLA's defaults it is.
    jax.jit(lambda x: x + 1, compiler_options=options).lower(np.float32(0)).compile()
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("XLA:CPU option %s=%s not accepted by this jaxlib (%s); compiling with "
                    "XLA's defaults, which run ResNets ~1.5x slower on CPU.", OPTION,
                    YNN_FUSION_TYPES, str(e).splitlines()[0])
    return None
  return options
