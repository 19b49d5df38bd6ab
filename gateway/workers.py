"""``gateway run``: one process, or a supervisor and ``public.workers`` worker processes.

With several workers the supervisor binds both listening sockets, then starts the workers
(``spawn``, so each gets a fresh interpreter) and hands them the sockets; the kernel spreads
new connections over the workers that accept on them. Each worker serves the public and the
internal listener (the public one with the built-in HTTP/1.1 server or Hypercorn, the others
with Hypercorn's Trio worker).

Stopping: SIGINT or SIGTERM to the supervisor sets a shared event; workers finish the
requests in flight (a few seconds at most) and exit. Workers ignore SIGINT (a terminal's
Ctrl-C reaches the whole process group; the supervisor coordinates) but stop on SIGTERM, and
stop by themselves if the supervisor disappears. A worker that dies is replaced, unless
workers keep dying, then the gateway exits with status 1.

Metrics: the supervisor creates a temporary directory for prometheus_client's multiprocess
mode and removes it on exit; a scrape of ``/metrics`` on any worker adds up all workers.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as EventType
from types import FrameType
from typing import Any

import trio

from gateway.app import (
    ListenError,
    ListenerSockets,
    Listening,
    bind_sockets,
    internal_tls_files,
    serve,
)
from gateway.config import GatewayConfig
from gateway.logging import configure_logging, get_logger
from gateway.metrics import MULTIPROC_ENV
from gateway.notary import prepare_notary_files

__all__ = ["run"]

_log = get_logger("gateway")

# A worker that dies sooner than this after its start counts towards giving up.
_EARLY_DEATH_SECONDS = 10.0
_MAX_EARLY_DEATHS = 5
_STOP_WAIT_SECONDS = 10.0


def run(config: GatewayConfig) -> int:
    """Serves until SIGINT/SIGTERM. Returns the process exit status."""
    configure_logging(config.log.format, config.log.level)
    try:
        if config.server.signing_key_path is not None:
            # Made once here, so every worker reads the same notary key, secret and
            # certificate instead of racing to create its own.
            prepare_notary_files(config.notary.state_dir)
        if config.public.workers == 1:
            # Bound before Trio starts, so a taken port is one ListenError, not a traceback
            # out of the listeners' nursery.
            sockets = bind_sockets(config)
            try:
                trio.run(_serve_single, config, sockets)
            finally:
                sockets.close()
            return 0
        return _supervise(config)
    except ListenError as e:
        print(f"gateway: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        _log.error("cannot start", error=str(e))
        return 1


async def _wait_first(*waiters: Callable[[], Awaitable[Any]]) -> None:
    async with trio.open_nursery() as nursery:
        for waiter in waiters:

            async def wait_then_cancel(w: Callable[[], Awaitable[Any]] = waiter) -> None:
                await w()
                nursery.cancel_scope.cancel()

            nursery.start_soon(wait_then_cancel)


async def _signal(*signums: int) -> None:
    with trio.open_signal_receiver(*signums) as received:
        async for signum in received:
            _log.info("stopping", signal=signal.Signals(signum).name)
            return


async def _serve_single(config: GatewayConfig, sockets: ListenerSockets) -> None:
    trigger = partial(_signal, signal.SIGINT, signal.SIGTERM)
    async with trio.open_nursery() as nursery:
        listening: Listening = await nursery.start(
            partial(serve, config, sockets=sockets, shutdown_trigger=trigger, reload_on_sighup=True)
        )
        _log.info(
            "gateway started",
            public_url=listening.public_url,
            internal_url=listening.internal_url,
            **({"outbound_url": listening.outbound_url} if listening.outbound_url else {}),
            workers=1,
        )
    _log.info("gateway stopped")


def _worker_main(
    config: GatewayConfig, sockets: ListenerSockets, stop: EventType, index: int, parent: int
) -> None:
    configure_logging(config.log.format, config.log.level, static={"worker": index})
    # Until the worker listens for it, a reload request must not kill the worker.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    async def stop_requested() -> None:
        # A multiprocessing event cannot wake a Trio task; poll it (and the parent's life).
        while not stop.is_set() and os.getppid() == parent:  # noqa: ASYNC110
            await trio.sleep(0.1)

    async def main() -> None:
        trigger = partial(_wait_first, stop_requested, partial(_signal, signal.SIGTERM))
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(
                    serve, config, sockets=sockets, shutdown_trigger=trigger, reload_on_sighup=True
                )
            )
            _log.info("worker started", pid=os.getpid())

    trio.run(main)


def _supervise(config: GatewayConfig) -> int:
    sockets = bind_sockets(config)
    metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
    os.environ[MULTIPROC_ENV] = metrics_dir
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    stopping = False

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if not stopping:
            _log.info("stopping", signal=signal.Signals(signum).name)
        stopping = True
        stop.set()

    def start(index: int) -> BaseProcess:
        process = context.Process(
            target=_worker_main,
            args=(config, sockets, stop, index, os.getpid()),
            name=f"gateway-worker-{index}",
        )
        process.start()
        return process

    # Workers inherit "ignore SIGINT"; the supervisor's own handler is installed after.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exit_status = 0
    processes: dict[int, BaseProcess] = {}
    started_at: dict[int, float] = {}
    early_deaths = 0
    try:
        for index in range(config.public.workers):
            processes[index] = start(index)
            started_at[index] = time.monotonic()
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)

        def on_hangup(_signum: int, _frame: FrameType | None) -> None:
            # Every worker reloads its own policy set from the same file.
            _log.info("reloading policies in every worker")
            for process in processes.values():
                if process.pid is not None and process.exitcode is None:
                    os.kill(process.pid, signal.SIGHUP)

        signal.signal(signal.SIGHUP, on_hangup)
        scheme = "https" if config.public.tls else "http"
        host, port = sockets.public.getsockname()[:2]
        ihost, iport = sockets.internal.getsockname()[:2]
        # The notary turns TLS on for the internal listener (the homeserver speaks HTTPS only).
        ischeme = "https" if internal_tls_files(config) is not None else "http"
        _log.info(
            "gateway started",
            public_url=f"{scheme}://{_host(host)}:{port}",
            internal_url=f"{ischeme}://{_host(ihost)}:{iport}",
            **(
                {"outbound_url": "http://{}:{}".format(*sockets.outbound.getsockname()[:2])}
                if sockets.outbound is not None
                else {}
            ),
            workers=config.public.workers,
        )
        while not stopping:
            sentinels = [p.sentinel for p in processes.values()]
            multiprocessing.connection.wait(sentinels, timeout=0.2)
            for index, process in list(processes.items()):
                if process.exitcode is None or stopping:
                    continue
                process.join()
                _log.error("worker exited", worker=index, exitcode=process.exitcode)
                if time.monotonic() - started_at[index] < _EARLY_DEATH_SECONDS:
                    early_deaths += 1
                if early_deaths > _MAX_EARLY_DEATHS:
                    _log.error("workers keep dying; giving up")
                    exit_status = 1
                    stopping = True
                    stop.set()
                    break
                processes[index] = start(index)
                started_at[index] = time.monotonic()
    finally:
        stop.set()
        deadline = time.monotonic() + _STOP_WAIT_SECONDS
        for process in processes.values():
            process.join(max(0.0, deadline - time.monotonic()))
        for index, process in processes.items():
            if process.is_alive():
                _log.warning("worker did not stop; terminating it", worker=index)
                process.terminate()
                process.join(2.0)
                if process.is_alive():
                    process.kill()
                    process.join()
        sockets.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    _log.info("gateway stopped")
    return exit_status


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
