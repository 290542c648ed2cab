"""gem_jax.teacher"""
