"""Running a service's app factory under uvicorn: one process, or several sharing one socket.

Python runs Python code on one core at a time per process (the GIL), and a retrieval request is
mostly Python (HTTP parsing, validation, RDKit calls, a small GNN forward): one process uses about
one core however many threads it has. Worker processes that accept from one listening socket put
every core to work; each holds its own copy of the indexes (tens of MB per corpus) and they meet
only in the data directory (see ``icma.retrieval.cache`` and ``icma.retrieval.store``).

The listening socket is made here rather than by uvicorn for one reason: asyncio turns Nagle's
algorithm off (TCP_NODELAY) only on sockets whose protocol number says TCP, and accepted
connections inherit the listener's. uvicorn's multi-worker path makes its socket with protocol 0,
so every response on a keep-alive connection then waits for the client's delayed ACK (about 40 ms
on Linux). Made with IPPROTO_TCP, the connections get TCP_NODELAY as a single process's do.

Spreading connections: with one socket that every worker accepts from, whichever worker wakes
first takes every pending connection, and a client's keep-alive connections opened together
land on one worker (measured: 6 of 8 on one of two workers, three times in three; 8 of 8 in a
load benchmark, which then ran on one core). So with several workers the supervisor accepts and
hands each connection (its file descriptor, over a Unix socket pair) to the next worker in turn:
8 connections are 4 and 4. A connection stays with its worker; the supervisor only accepts.
Workers adopt connections with uvicorn's own HTTP protocol class, as its server does for the
connections it accepts.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
from typing import Any, Callable

from icma.core.errors import InputError

log = logging.getLogger(__name__)

#: uvicorn's exit status when an app fails to start (then restarting it would fail the same way).
STARTUP_FAILURE = 3
#: An app factory: "module:function", or the function (uvicorn accepts either).
AppFactory = str | Callable[[], Any]
#: Thread-pool variables a worker shares the cores by (set only where the user has not).
THREAD_VARIABLES = ("ICMA_TORCH_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "MKL_NUM_THREADS")


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket (not yet listening; uvicorn calls listen with its backlog); port 0
    takes a free one."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InputError(f"cannot resolve host {host!r}: {exc.strerror}", field="--host") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror}", field="--port") \
            from None
    sock.set_inheritable(True)
    return sock


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback one (only this machine can connect).
    A name that does not resolve counts as loopback: binding it fails with its own error."""
    import ipaddress

    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return True
    return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def check_exposure(host: str, api_key, allow_remote_without_key: bool) -> None:
    """Refuse to listen where other machines can connect when no API key protects the
    service, unless the operator said so (``ICMA_ALLOW_REMOTE_WITHOUT_KEY``)."""
    if api_key is None and not allow_remote_without_key and not is_loopback(host):
        raise InputError(f"{host} is reachable from other machines and no ICMA_API_KEY is set: "
                         f"set a key (clients send 'Authorization: Bearer <key>'), listen on "
                         f"127.0.0.1, or set ICMA_ALLOW_REMOTE_WITHOUT_KEY=true to serve "
                         f"without one", field="--host")


def serve(factory: AppFactory, host: str = "127.0.0.1", port: int = 8001,
          workers: int = 1, log_level: str = "info") -> int:
    """Serve ``factory`` ("module:function" returning an ASGI app, or such a function itself)
    until SIGINT or SIGTERM. Spawned workers (``workers`` > 1) get the factory pickled, so a
    function must be importable (a module-level function, or a partial of one).

    With ``workers`` > 1 each worker process gets cores / workers threads for torch, OpenMP and
    BLAS unless the environment sets them, so that the workers do not oversubscribe the cores.
    Returns the exit status: 0, or 1 when a worker could not start.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InputError(f"workers must be a positive integer, got {workers!r}", field="--workers")
    if not 0 < port < 65536:
        raise InputError(f"port must be 1-65535, got {port}", field="--port")
    sock = listening_socket(host, port)
    if workers == 1:
        _run_worker(factory, sock, log_level)
        return 0
    share = str(max(1, (os.cpu_count() or 1) // workers))
    for name in THREAD_VARIABLES:
        os.environ.setdefault(name, share)  # spawned workers inherit the environment
    return _Supervisor(factory, sock, workers, log_level).run()


def _run_worker(factory: AppFactory, sock: socket.socket, log_level: str) -> None:
    import uvicorn

    config = uvicorn.Config(factory, factory=True, log_level=log_level)
    uvicorn.Server(config).run(sockets=[sock])


def _run_dispatched_worker(factory: AppFactory, channel: socket.socket, log_level: str) -> None:
    """A worker that serves the connections the supervisor sends over ``channel``."""
    import asyncio

    import uvicorn

    config = uvicorn.Config(factory, factory=True, log_level=log_level)
    server = uvicorn.Server(config)

    async def main() -> None:
        serving = asyncio.ensure_future(server.serve(sockets=[]))  # no listener of its own
        while not server.started and not serving.done():
            await asyncio.sleep(0.01)
        if serving.done():  # start-up failed: uvicorn exits with STARTUP_FAILURE
            return await serving
        loop = asyncio.get_running_loop()

        def protocol():
            return config.http_protocol_class(config=config, server_state=server.server_state,
                                              app_state=server.lifespan.state)

        def adopt() -> None:
            try:
                msg, fds, _, _ = socket.recv_fds(channel, 1, 16)
            except BlockingIOError:
                return
            if not msg:  # the supervisor is gone: finish what is in flight and stop
                loop.remove_reader(channel.fileno())
                server.should_exit = True
                return
            for fd in fds:
                conn = socket.socket(fileno=fd)
                loop.create_task(loop.connect_accepted_socket(protocol, conn))

        channel.setblocking(False)
        loop.add_reader(channel.fileno(), adopt)
        await serving

    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(main())


class _Supervisor:
    """Accepts connections and deals them out to the workers in turn; restarts a worker that
    dies after it started; stops them all on SIGINT or SIGTERM."""

    def __init__(self, factory: AppFactory, sock: socket.socket, workers: int, log_level: str):
        self.factory, self.sock, self.log_level = factory, sock, log_level
        self.workers = workers
        self.ctx = multiprocessing.get_context("spawn")  # no fork: torch and OpenMP dislike it
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.processes: list = []
        self.channels: list[socket.socket] = []

    def _start(self) -> tuple:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        p = self.ctx.Process(target=_run_dispatched_worker, name="icma-worker", daemon=False,
                             args=(self.factory, theirs, self.log_level))
        p.start()
        theirs.close()
        return p, ours

    def _dispatch(self) -> None:
        self.sock.listen(2048)
        self.sock.settimeout(0.5)  # to notice the stop flag
        turn = 0
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self.stop.is_set():
                    return
                log.exception("accept failed")
                continue
            with conn, self.lock:
                for _ in range(self.workers):  # skip a worker whose channel is broken
                    channel = self.channels[turn % self.workers]
                    turn += 1
                    try:
                        socket.send_fds(channel, [b"c"], [conn.fileno()])
                        break
                    except OSError:
                        continue

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stop.set())
        log.info("supervisor %d: starting %d workers", os.getpid(), self.workers)
        with self.lock:
            for p, channel in (self._start() for _ in range(self.workers)):
                self.processes.append(p)
                self.channels.append(channel)
        dispatcher = threading.Thread(target=self._dispatch, name="icma-dispatch", daemon=True)
        dispatcher.start()
        status = 0
        while not self.stop.wait(0.5):
            for i, p in enumerate(self.processes):
                if p.is_alive():
                    continue
                if p.exitcode == STARTUP_FAILURE:
                    log.error("worker %d failed to start; stopping", p.pid)
                    status = 1
                    self.stop.set()
                    break
                log.warning("worker %d exited (%s); starting another", p.pid, p.exitcode)
                with self.lock:
                    self.channels[i].close()
                    self.processes[i], self.channels[i] = self._start()
        dispatcher.join(timeout=5)
        for p in self.processes:  # uvicorn finishes in-flight requests on SIGTERM
            if p.is_alive():
                p.terminate()
        for p in self.processes:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
        for channel in self.channels:
            channel.close()
        self.sock.close()
        return status
