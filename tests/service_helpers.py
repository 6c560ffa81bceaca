"""Running a service for real: uvicorn on 127.0.0.1, an ephemeral port, in a thread."""

from __future__ import annotations

import threading

import uvicorn

from icma.server.spawn import wait_ready
from icma.server.supervisor import listening_socket


class LiveServer:
    def __init__(self, app):
        # The product's socket (TCP_NODELAY on accepted connections; see icma.server.supervisor).
        self.sock = listening_socket("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        wait_ready(self.url, name="server", path="/healthz", timeout=120, interval=0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def wait_ready(self, timeout: float = 300) -> None:
        wait_ready(self.url, name="server", timeout=timeout, interval=0.2)


class Recording:
    """Wraps an engine and keeps every prompt it is given (to compare with icma.core.prompts)."""

    def __init__(self, engine):
        self.engine, self.prompts = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, inputs, params, adapter=None):
        self.prompts.extend(x.prompt for x in inputs)
        return self.engine.generate(inputs, params, adapter=adapter)
