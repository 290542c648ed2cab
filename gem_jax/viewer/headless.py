"""The viewer in a headless Chromium, driven by Playwright for Python (tests, benchmarks, screenshots).

    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw, serve_folder("runs/q/web") as url:
        browser = launch(pw)                          # the system Chromium, software WebGL2
        page, errors = open_viewer(browser, url + "?scale=2")
        image = read_canvas(page)                     # (H, W, 3) float in [0, 1]

The browser is the system's own (Debian's ``chromium`` package, or ``GEM_JAX_CHROMIUM``) started
through ``executable_path``: nothing is ever downloaded (no ``playwright install``). WebGL runs
in software: Mesa's llvmpipe through ANGLE's EGL backend (``gl="llvmpipe"``, preferred by
``gl="auto"``: several times faster than SwiftShader for instanced splats on this project's
scenes, see ``benchmarks/bench_viewer.py``) or SwiftShader (``gl="swiftshader"``, bundled with
Chromium, the fallback where Mesa's drivers are missing). The machine may have no
network: background networking, component updates, sync and QUIC are off.
"""

from __future__ import annotations

import base64
import os
import shutil

import numpy as np

__all__ = ["BASE_ARGS", "GL_ARGS", "BrowserUnavailable", "find_chromium", "launch", "open_viewer", "read_canvas"]

BASE_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-first-run", "--disable-quic", "--disable-default-apps", "--mute-audio"]
GL_ARGS = {
    "llvmpipe": ["--use-angle=gl-egl", "--ignore-gpu-blocklist"],
    "swiftshader": ["--use-angle=swiftshader", "--enable-unsafe-swiftshader"],
}


class BrowserUnavailable(RuntimeError):
    """No Chromium could be found or started here (the message says why)."""


def find_chromium() -> str | None:
    """``GEM_JAX_CHROMIUM``, else ``chromium`` / ``chromium-browser`` on the PATH, else None."""
    explicit = os.environ.get("GEM_JAX_CHROMIUM")
    if explicit:
        return explicit if os.path.isfile(explicit) else None
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


_HAS_WEBGL2 = "() => !!document.createElement('canvas').getContext('webgl2')"


def launch(playwright, gl: str = "auto", executable: str | None = None):
    """A headless system Chromium with software WebGL2; raises :class:`BrowserUnavailable`.

    ``gl="auto"`` takes llvmpipe when it gives WebGL2 here (Mesa's drivers installed), else
    SwiftShader (bundled with Chromium).
    """
    if gl != "auto" and gl not in GL_ARGS:
        raise ValueError(f"gl must be 'auto' or one of {sorted(GL_ARGS)}, got {gl!r}")
    executable = executable or find_chromium()
    if executable is None:
        raise BrowserUnavailable("no Chromium found (install Debian's `chromium` package, or set GEM_JAX_CHROMIUM)")
    problems = []
    for mode in GL_ARGS if gl == "auto" else [gl]:
        try:
            browser = playwright.chromium.launch(executable_path=executable, headless=True,
                                                 args=BASE_ARGS + GL_ARGS[mode])
        except Exception as err:  # playwright's Error for a browser that will not start
            raise BrowserUnavailable(f"{executable} did not start: {str(err).splitlines()[0]}") from err
        page = browser.new_page()
        ok = page.evaluate(_HAS_WEBGL2)
        page.close()
        if ok:
            return browser
        browser.close()
        problems.append(f"no WebGL2 with {mode}")
    raise BrowserUnavailable(f"{executable} started, but: {'; '.join(problems)}")


def open_viewer(browser, url: str, viewport: tuple[int, int] = (1000, 700), timeout_s: float = 60.0,
                init_script: str | None = None):
    """A new page at ``url``, waited on until the viewer is ready or has shown an error.

    Returns ``(page, errors)``: ``errors`` collects the page's console errors and uncaught
    exceptions as they happen (a live list).
    """
    page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda err: errors.append(f"uncaught: {err}"))
    if init_script:
        page.add_init_script(init_script)
    page.goto(url)
    page.wait_for_function("document.documentElement.dataset.state !== 'loading'", timeout=timeout_s * 1e3)
    return page, errors


def read_canvas(page) -> np.ndarray:
    """The canvas after the current state has been drawn: ``(H, W, 3)`` float32 in [0, 1]."""
    page.evaluate("gemViewer.settled()")
    info = page.evaluate("gemViewer.info()")
    data = base64.b64decode(page.evaluate("gemViewer.readPixels()"))
    rgba = np.frombuffer(data, np.uint8).reshape(info["height"], info["width"], 4)
    return rgba[..., :3].astype(np.float32) / 255.0
