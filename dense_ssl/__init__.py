"""dense_ssl: dense self-supervised pretraining of vision backbones in JAX/Flax."""
