"""gem_jax.eigen"""
