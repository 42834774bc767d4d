"""Flax linen modules built on ``jaxlab.kernels``: Transformers, linear-attention and SSM mixers, MoE."""
