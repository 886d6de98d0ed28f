"""mla_jax: language models from Multi-head Latent Attention, GQA, Mixture-of-Experts and Mamba2 layers."""

__version__ = "0.1.0"
