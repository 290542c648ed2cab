"""``python -m gem_jax.viewer`` — serve the GEM viewer on this machine (docs/architecture.md §11).

    python -m gem_jax.viewer --model runs/q                      # export to a temp folder, serve
    python -m gem_jax.viewer --model runs/q --port 8000 --open   # and open a browser tab
    python -m gem_jax.viewer --model runs/q/web                  # serve an existing web export
    python -m gem_jax.viewer --model runs/q --sequence out.npy   # with a reenactment to play

``--model`` is a work directory (after ``--stage pca``; the refined model when present) or a
folder written by ``python -m gem_jax.export --web``. The page is served by the standard
library's HTTP server on 127.0.0.1 only, unless ``--host`` names another interface.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import sys
import tempfile
import threading
import webbrowser
from collections.abc import Iterator
from pathlib import Path

__all__ = ["main", "serve_folder"]


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files with JavaScript served as JavaScript whatever the system's MIME table says,
    and no caching (a re-export shows at the next reload)."""

    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".js": "text/javascript", ".json": "application/json", ".bin": "application/octet-stream"}

    def end_headers(self):
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format, *args):  # quiet: one line per request is noise here
        pass


@contextlib.contextmanager
def serve_folder(folder: str | Path, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``folder`` over HTTP in a background thread; yields the base URL (``port=0``: any free port)."""
    handler = functools.partial(_Handler, directory=str(folder))
    server = http.server.ThreadingHTTPServer((host, port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        name = f"[{host}]" if ":" in host else host
        yield f"http://{name}:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m gem_jax.viewer", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="work directory of a run, or a folder written by export --web")
    p.add_argument("--port", type=int, default=8000, help="port to serve on (0: any free port)")
    p.add_argument("--host", default="127.0.0.1", help="interface to serve on (default: this machine only)")
    p.add_argument("--open", action="store_true", help="open the page in the default browser")
    p.add_argument("--stage", choices=("refine", "pca"), default=None, help="which model of a work directory")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="storage of the exported model")
    p.add_argument("--sequence", action="append", default=[],
                   help="a coefficient sequence (F, ΣK) .npy to offer in the page (repeatable)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    import numpy as np

    from gem_jax.viewer.webexport import MANIFEST, export_workdir

    args = _parse(sys.argv[1:] if argv is None else argv)
    model = Path(args.model)
    with contextlib.ExitStack() as stack:
        if (model / MANIFEST).is_file():
            if args.sequence:
                raise SystemExit("--sequence needs a work directory (the export is written anew)")
            folder = model
        elif model.is_dir():
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gem_viewer_")))
            sequences = {Path(s).name: np.load(s, allow_pickle=False) for s in args.sequence}
            try:
                export_workdir(model, folder, args.dtype, args.stage, sequences)
            except (FileNotFoundError, ValueError) as err:
                raise SystemExit(f"python -m gem_jax.viewer: {err}") from err
        else:
            raise SystemExit(f"--model {model}: no such work directory or web export")
        try:
            url = stack.enter_context(serve_folder(folder, args.host, args.port))
        except OSError as err:  # port taken, unknown host, …
            raise SystemExit(f"python -m gem_jax.viewer: cannot serve on {args.host}:{args.port} ({err}); "
                             "try another --port (0: any free one)") from err
        print(f"GEM viewer: {url}  (serving {folder}; Ctrl+C to stop)", flush=True)
        if args.open:
            webbrowser.open(url)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            print("stopped", flush=True)
    return 0
