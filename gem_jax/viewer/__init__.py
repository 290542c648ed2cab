"""gem_jax.viewer — the avatar in a browser (docs/architecture.md §11).

* :mod:`gem_jax.viewer.webexport` writes and reads the static web export (``model.json`` +
  ``model.bin`` beside the page's ``index.html`` and JavaScript from ``web/``);
* ``python -m gem_jax.viewer --model runs/q`` exports to a temporary folder and serves it
  on 127.0.0.1 (:mod:`gem_jax.viewer.serve`);
* :mod:`gem_jax.viewer.headless` opens the page in a headless Chromium (tests, benchmarks).
"""
