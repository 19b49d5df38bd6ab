"""The ``gateway`` command as a subprocess: check's exit codes, run with workers, signals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import trio

from tests.unit.app.conftest import FakeHomeserver, free_port_url

GATEWAY = [sys.executable, "-m", "gateway"]


def write_config(tmp_path: Path, homeserver_url: str, extra: str = "") -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(
        f"""
[server]
server_name = "hs.test"
[homeserver]
url = "{homeserver_url}"
connect_timeout = 2.0
read_timeout = 5.0
[internal]
bind = "127.0.0.1:0"
[log]
format = "json"
{extra}
"""
    )
    return path


async def run_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(30):
        return await trio.run_process(
            [*GATEWAY, *args], capture_stdout=True, capture_stderr=True, check=False
        )


async def test_check_names_the_wrong_key(tmp_path: Path) -> None:
    path = write_config(tmp_path, "http://127.0.0.1:1", '[public]\nworkers = "two"\n')
    result = await run_cli("check", "--config", str(path))
    assert result.returncode == 1
    assert (
        "public.workers: must be \"auto\" or an integer from 1 to 64, got 'two'"
        in result.stderr.decode()
    )


async def test_check_missing_file(tmp_path: Path) -> None:
    result = await run_cli("check", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 1
    assert "file not found" in result.stderr.decode()


async def test_check_passes_when_the_homeserver_answers(
    tmp_path: Path, homeserver: FakeHomeserver
) -> None:
    result = await run_cli("check", "--config", str(write_config(tmp_path, homeserver.url)))
    assert result.returncode == 0, result.stderr.decode()
    assert "ok (Fake 1.0)" in result.stdout.decode()


async def test_check_fails_when_the_homeserver_is_down(tmp_path: Path) -> None:
    result = await run_cli("check", "--config", str(write_config(tmp_path, free_port_url())))
    assert result.returncode == 2
    assert "homeserver.url" in result.stderr.decode()


class Running:
    """A ``gateway run`` subprocess whose JSON log lines are collected."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.lines: list[dict[str, Any]] = []
        self.changed = trio.Event()

    async def collect(self) -> None:
        assert self.process.stderr is not None
        buffer = b""
        async for data in self.process.stderr:
            buffer += data
            *complete, buffer = buffer.split(b"\n")
            for line in complete:
                try:
                    self.lines.append(json.loads(line))
                except ValueError:
                    self.lines.append({"event": line.decode(errors="replace")})
            self.changed.set()
            self.changed = trio.Event()

    async def wait_for(self, event: str, count: int = 1) -> list[dict[str, Any]]:
        with trio.fail_after(20):
            while True:
                found = [line for line in self.lines if line.get("event") == event]
                if len(found) >= count:
                    return found
                assert self.process.poll() is None, self.lines
                await self.changed.wait()


async def start_gateway_process(nursery: trio.Nursery, config: Path) -> Running:
    process = await trio.lowlevel.open_process(
        [*GATEWAY, "run", "--config", str(config)], stderr=subprocess.PIPE
    )
    running = Running(process)
    nursery.start_soon(running.collect)
    return running


async def stop(running: Running, signum: int) -> int:
    running.process.send_signal(signum)
    with trio.fail_after(15):
        return await running.process.wait()


async def test_run_with_two_workers_aggregates_metrics_and_stops_on_sigterm(
    tmp_path: Path, homeserver: FakeHomeserver, nursery: trio.Nursery
) -> None:
    config = write_config(tmp_path, homeserver.url, '[public]\nbind = "127.0.0.1:0"\nworkers = 2\n')
    running = await start_gateway_process(nursery, config)
    try:
        started = (await running.wait_for("gateway started"))[0]
        assert started["workers"] == 2
        workers = await running.wait_for("worker started", 2)
        assert {line["worker"] for line in workers} == {0, 1}
        assert len({line["pid"] for line in workers}) == 2
        public, internal = started["public_url"], started["internal_url"]
        for _ in range(10):
            async with httpx.AsyncClient() as client:  # a new connection each time
                r = await client.get(public + "/_matrix/federation/v1/version")
                assert r.status_code == 200
        for _ in range(4):
            async with httpx.AsyncClient() as client:
                text = (await client.get(internal + "/metrics")).text
            # Whichever worker answers the scrape, the numbers are the sum over both.
            assert "gateway_worker_starts_total 2.0" in text
            assert 'gateway_requests_total{route="passthrough",status="200"} 10.0' in text
    finally:
        returncode = await stop(running, signal.SIGTERM)
    assert returncode == 0
    stopped = await running.wait_for("gateway stopped")
    assert stopped


async def test_run_single_process_stops_on_sigint(
    tmp_path: Path, homeserver: FakeHomeserver, nursery: trio.Nursery
) -> None:
    config = write_config(tmp_path, homeserver.url, '[public]\nbind = "127.0.0.1:0"\n')
    running = await start_gateway_process(nursery, config)
    try:
        started = (await running.wait_for("gateway started"))[0]
        async with httpx.AsyncClient() as client:
            r = await client.get(started["public_url"] + "/_matrix/federation/v1/version")
            health = await client.get(started["internal_url"] + "/health")
        assert r.json() == {"server": {"name": "Fake", "version": "1.0"}}
        assert health.status_code == 200
    finally:
        returncode = await stop(running, signal.SIGINT)
    assert returncode == 0


async def test_run_refuses_an_invalid_config(tmp_path: Path) -> None:
    path = write_config(tmp_path, "http://127.0.0.1:1", '[internal]\nbind = "10.0.0.1:1"\n')
    path.write_text(path.read_text().replace('[internal]\nbind = "127.0.0.1:0"\n', ""))
    result = await run_cli("run", "--config", str(path))
    assert result.returncode == 1
    assert "internal.bind: must be a loopback address" in result.stderr.decode()


def test_demo_forwards_only_the_given_arguments(monkeypatch: Any) -> None:
    import gateway.demo.stack
    from gateway.cli import main

    calls: list[list[str]] = []
    monkeypatch.setattr(gateway.demo.stack, "main", lambda argv: calls.append(list(argv)) or 0)
    assert main(["demo"]) == 0
    assert main(["demo", "--data-dir", "d", "--port", "9000", "--config", "c.toml"]) == 0
    assert calls == [[], ["--data-dir", "d", "--port", "9000", "--config", "c.toml"]]
