"""``python -m gem_jax.viewer`` (see :mod:`gem_jax.viewer.serve`)."""

import sys

from gem_jax.viewer.serve import main

sys.exit(main())
