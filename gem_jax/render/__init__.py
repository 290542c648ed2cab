"""gem_jax.render"""
