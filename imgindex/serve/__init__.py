"""`imgindex serve`: an index answered over HTTP, as a JSON API and a self-contained web page:
`app` (the routes, `create_app`), `batcher` (queries answered together) and `page.html`.
"""
import logging

from imgindex.errors import ConfigError, install_hint
from imgindex.serve.app import create_app

log = logging.getLogger(__name__)

__all__ = ["create_app", "serve"]


def serve(index_dir: str, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
          max_upload: int = 20 * 2**20, device: str | None = None) -> None:
    """Serve until Ctrl-C."""
    try:
        import uvicorn
    except ImportError:
        raise ConfigError(f"imgindex serve needs its extra: {install_hint('serve')}") from None
    app = create_app(index_dir, token=token, max_upload=max_upload, device=device)
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        log.warning("serving %s on %s without --token: anyone who reaches this address can query the index and "
                    "read its thumbnails", index_dir, host)
    print(f"imgindex: serving {index_dir} ({app.state.searcher.index.ntotal} images) at http://{host}:{port}/ "
          f"(API docs at /docs); Ctrl-C to stop", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
