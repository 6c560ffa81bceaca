"""Joining a Ray cluster, for the Ray paths of translation (``icma.jobs.ray_executor``) and
tuning (``icma.tuning.ray_train``): one place for the address rules and the errors."""

from __future__ import annotations

import logging
import os

from icma.core.errors import UnavailableError


def connect(address: str | None) -> None:
    """Join the Ray cluster at ``address`` (None: RAY_ADDRESS, else start one here; ``auto``:
    the cluster running on this machine). A cluster that cannot be reached is an
    ``UnavailableError`` naming the address."""
    try:
        import ray
    except ImportError:
        raise UnavailableError("the ray executor needs Ray: pip install 'icma[ray]'",
                               field="executor") from None
    if ray.is_initialized():
        return
    # No address: RAY_ADDRESS, else a runtime of our own ("local"; Ray's own default would
    # try a cluster it once recorded in /tmp/ray, and wait minutes when that one is gone).
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    _check_reachable(address)
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                 configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        hint = ("" if os.environ.get("RAY_AUTH_MODE") else
                " (a cluster from `ray start` asks for its token: set RAY_AUTH_MODE=token, "
                "and RAY_AUTH_TOKEN unless ~/.ray/auth_token holds it)")
        raise UnavailableError(f"cannot join the Ray cluster at {address or 'RAY_ADDRESS'}: "
                               f"{first_line(exc)}{hint}", field="ray_address") from None
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False  # the driver shows its own
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # not its plan and timings


def _check_reachable(address: str | None) -> None:
    """A HOST:PORT nobody listens on is refused at once (``ray.init`` would retry it for
    minutes); ``ray://`` addresses and ``auto`` are left to Ray."""
    import socket

    if not address or "://" in address or address in ("auto", "local"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UnavailableError(f"cannot join the Ray cluster at {address}: not HOST:PORT, "
                               "ray://HOST:PORT or auto", field="ray_address")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        raise UnavailableError(f"cannot join the Ray cluster at {address}: nothing answers "
                               f"there ({exc.strerror or type(exc).__name__})",
                               field="ray_address") from None



def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
