"""A real kvrun server for tests: uvicorn on a free loopback port, in a background thread of the test process."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import httpx
import uvicorn

from kvrun.serving import ServerConfig, create_app


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    config: ServerConfig
    app: object
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def serving(self):
        return self.app.state.serving

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def start_server(config: ServerConfig, startup_timeout_s: float = 120) -> RunningServer:
    port = free_port()
    config = ServerConfig(**{**_fields(config), "host": "127.0.0.1", "port": port})
    app = create_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the test server failed to start (see the log above)")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise TimeoutError("the test server did not start in time")
        time.sleep(0.05)
    return RunningServer(f"http://127.0.0.1:{port}", config, app, server, thread)


def _fields(config: ServerConfig) -> dict:
    return {name: getattr(config, name) for name in config.__dataclass_fields__}
