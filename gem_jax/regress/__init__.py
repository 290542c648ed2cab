"""gem_jax.regress"""
