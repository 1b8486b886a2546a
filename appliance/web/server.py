"""Run the portal under gunicorn (threaded workers: each proxied stream or WebSocket holds a
thread, the rest of the worker keeps serving)."""

from __future__ import annotations

from typing import Any

from gunicorn.app.base import BaseApplication

from ..config import Config


class Portal(BaseApplication):
    def __init__(self, config: Config, options: dict[str, Any]):
        self.appliance_config = config
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self):
        from .app import create_app

        return create_app(self.appliance_config)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def options(config: Config, host: str, port: int, workers: int) -> dict[str, Any]:
    binds = [_address(host, port)]
    if config.portal_apps_port:  # the Spaces' apps on an origin of their own
        binds.append(_address(host, config.portal_apps_port))
    return {
        "bind": binds,
        "workers": workers,
        "worker_class": "gthread",
        "threads": config.portal_threads,
        # With several workers, loading the app once in the master lets them share its pages;
        # a single worker would only double it.
        "preload_app": workers > 1,
        # Streams (logs, SSE, WebSockets) stay open for as long as the visitor watches.
        "timeout": 0,
        "graceful_timeout": 10,
        "keepalive": 75,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": "warning",
        "proc_name": "appliance-portal",
        "worker_tmp_dir": "/dev/shm",
        "forwarded_allow_ips": "127.0.0.1,::1",
    }


def serve(config: Config, host: str, port: int, workers: int) -> None:
    Portal(config, options(config, host, port, workers)).run()


def main() -> None:
    """Run gunicorn's master in a fresh interpreter that has imported only this module and
    the settings (`appliance serve` execs it): the app itself loads in the workers, so the
    master stays small."""
    from ..config import load_config

    config = load_config()
    serve(config, config.portal_host, config.portal_port, config.portal_workers)


if __name__ == "__main__":
    main()
