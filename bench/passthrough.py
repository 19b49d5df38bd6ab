"""Passthrough cost: Synapse directly, through the gateway (standalone and behind nginx), and
through nginx alone.

    python bench/passthrough.py [--duration 10] [--connections 32] [--requests 3000]
                                [--upstream-parser {hand-written,both}]
                                [--profile gateway.svg] [--keep]

Starts, in one run on this machine, a real Synapse (SQLite, loopback) with the gateway in
front (the demo's stack, one gateway worker), a second gateway in front of the same Synapse
with ``public.workers = "auto"`` (one worker per core), a third one on Hypercorn
(``public.http_server = "hypercorn"``, the baseline for the built-in HTTP/1.1 server), nginx
as a plain reverse proxy to Synapse, and nginx configured by ``gateway proxy-config --for
nginx`` (front-proxy mode: owned endpoints to the gateway, the rest straight to Synapse).
Each nginx runs one worker with kept-alive upstream connections. For a small federation GET
(``/_matrix/federation/v1/version``, not owned: front-proxy mode sends it straight to
Synapse) it measures, for each of the six (seven with ``--upstream-parser both``):

- throughput: ``wrk`` (one thread, a fixed number of keep-alive connections, a fixed
  duration, after a short warm-up), requests per second;
- latency: a sequential keep-alive client in its own process (raw sockets, one request at a
  time, the targets taking turns), p50 and p99;
- CPU per request: user + system CPU time the server processes spent during the wrk run,
  divided by the requests served. On a shared two-core machine this is the steadier
  measure of cost: the gateway's column is what it adds to Synapse's.

and prints a table, the ratios to nginx alone and to Synapse direct, and the median latency
each adds.

``--upstream-parser both`` adds a row: one more gateway (one worker, built-in server) whose
client to the homeserver parses responses with h11 instead of the hand-written parser of
``gateway/http1/client.py``, started through ``bench/h11_upstream.py`` (which swaps the pool
class before running the gateway's command line); its ratio to (b) compares the two parsers
under the same pool (its throughput is measured right after (b)'s). ``hand-written`` (the
default) measures only the parser in use.

``nginx`` and ``wrk`` come from Debian; when missing they are installed with
``apt-get`` (this needs root). ``--profile`` records the gateway with ``py-spy`` during its
throughput run (``pip install py-spy``). Every process started here is stopped at the end,
also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.demo.stack import Stack, StackProcesses, gateway_process, prepare_stack, to_toml
from gateway.demo.synapse import ServiceProcess, free_port
from tests.support.nginx import nginx_service

PATH = "/_matrix/federation/v1/version"
WARMUP_SECONDS = 2.0
LATENCY_ROUNDS = 5


# --- tools -------------------------------------------------------------------------------


def ensure_debian_tool(command: str, package: str) -> str:
    """The path of ``command``, installing Debian's ``package`` with apt-get if missing."""
    found = shutil.which(command) or shutil.which(command, path="/usr/sbin:/sbin")
    if found:
        return found
    print(f"{command} is not installed: installing Debian's {package} with apt-get ...")
    if os.geteuid() != 0:
        sys.exit(f"{command} is missing and installing it needs root: apt-get install {package}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", package]
    if subprocess.run(install, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, stdout=subprocess.DEVNULL, check=True)
        subprocess.run(install, env=env, stdout=subprocess.DEVNULL, check=True)
    found = shutil.which(command) or shutil.which(command, path="/usr/sbin:/sbin")
    if not found:
        sys.exit(f"installed {package} but {command} is still not on PATH")
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and its children still running."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in [pid, *_descendants(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def _descendants(pid: int) -> list[int]:
    children: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return children
    for task in tasks:
        with contextlib.suppress(FileNotFoundError):
            for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split():
                children.append(int(child))
                children.extend(_descendants(int(child)))
    return children


# --- nginx -------------------------------------------------------------------------------


def nginx_process(nginx: str, directory: Path, port: int, upstream: str) -> ServiceProcess:
    """nginx as a plain reverse proxy to ``upstream``, in the foreground (no daemon)."""
    host_port = upstream.split("://", 1)[1].rstrip("/")
    snippet = textwrap.dedent(
        f"""\
        upstream homeserver {{
            server {host_port};
            keepalive 64;
        }}
        server {{
            listen 127.0.0.1:{port};
            location / {{
                proxy_pass http://homeserver;
                proxy_http_version 1.1;
                proxy_set_header Connection "";
                proxy_set_header Host $host;
                proxy_set_header X-Forwarded-For $remote_addr;
                proxy_set_header X-Forwarded-Proto $scheme;
            }}
        }}
        """
    )
    return nginx_service(nginx, directory, snippet, ready_url=f"http://127.0.0.1:{port}{PATH}")


def front_proxy_process(
    nginx: str, directory: Path, port: int, config_path: Path
) -> ServiceProcess:
    """nginx with the routing ``gateway proxy-config --for nginx`` prints for ``config_path``."""
    argv = [sys.executable, "-m", "gateway", "proxy-config", "--for", "nginx"]
    argv += ["--config", str(config_path), "--listen", f"127.0.0.1:{port}"]
    snippet = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return nginx_service(nginx, directory, snippet, ready_url=f"http://127.0.0.1:{port}{PATH}")


def extra_gateway(
    stack: Stack, directory: Path, *, launcher: Path | None = None, **public: Any
) -> tuple[ServiceProcess, str]:
    """Another gateway in front of the stack's Synapse, with ``public`` settings on top of
    the stack's (its own ports and database, no outbound listener); returns it and its
    public URL. ``launcher`` is a script run instead of ``python -m gateway`` (it takes the
    gateway's command line)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in stack.gateway_config.items()}
    public_port, internal_port = free_port(), free_port()
    config["public"] = {
        **config["public"],
        "bind": f"127.0.0.1:{public_port}",
        **public,
    }
    config["internal"] = {"bind": f"127.0.0.1:{internal_port}"}
    config["notary"] = {**config["notary"], "state_dir": str(stack.data_dir / "state")}
    config["store"] = {**config["store"], "sqlite_path": str(directory / "gateway.db")}
    config["server"] = {
        **config["server"],
        "signing_key_path": str(stack.synapse.signing_key_path),
    }
    config.pop("outbound", None)
    config_path = directory / "gateway.toml"
    config_path.write_text(to_toml(config))
    ready_url = f"https://127.0.0.1:{internal_port}/health"
    log_path = directory / "gateway.log"
    if launcher is None:
        process = gateway_process(config_path, ready_url=ready_url, log_path=log_path)
    else:
        process = ServiceProcess(
            f"the gateway ({launcher.name})",
            [sys.executable, str(launcher), "run", "--config", str(config_path)],
            ready_url=ready_url,
            console_path=log_path,
            cwd=config_path.parent,
        )
    return process, f"http://127.0.0.1:{public_port}"


# --- load --------------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    rps: float = 0.0
    wrk_p50_ms: float = 0.0
    wrk_p99_ms: float = 0.0
    errors: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    cpu_us: float = 0.0  # server CPU per request, microseconds


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _wrk_time_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not match:
        return float("nan")
    return float(match[1]) * _UNITS[match[2]]


def run_wrk(
    wrk: str, url: str, connections: int, seconds: float
) -> tuple[float, int, dict[str, float]]:
    """(requests per second, errors, latency percentiles in ms) from one wrk run."""
    argv = [wrk, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=True)
    text = out.stdout
    rps_match = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not rps_match:
        raise RuntimeError(f"cannot read wrk's output:\n{text}\n{out.stderr}")
    errors = 0
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if non_2xx:
        errors += int(non_2xx[1])
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    if socket_errors:
        errors += sum(int(x) for x in socket_errors.groups())
    percentiles = {
        m[1]: _wrk_time_ms(m[2]) for m in re.finditer(r"^\s+(\d+)%\s+(\S+)$", text, re.M)
    }
    return float(rps_match[1]), errors, percentiles


def latency_client(host: str, port: int, path: str, count: int) -> list[float]:
    """Seconds per request, one at a time over a kept-alive connection (opened again, outside
    the timing, when the server ends it: servers cap requests per connection)."""
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: bench\r\n\r\n".encode()
    sock = socket.socket()
    buffer = b""

    def connect() -> None:
        nonlocal sock, buffer
        sock.close()
        sock = socket.create_connection((host, port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffer = b""

    def fill(need: int) -> None:
        nonlocal buffer
        while len(buffer) < need:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            buffer += chunk

    def take(size: int) -> None:
        nonlocal buffer
        fill(size)
        buffer = buffer[size:]

    def line() -> bytes:
        nonlocal buffer
        while b"\r\n" not in buffer:
            fill(len(buffer) + 1)
        text, _, buffer = buffer.partition(b"\r\n")
        return text

    def exchange() -> bool:
        """One request and its response; False when the server closes the connection."""
        nonlocal buffer
        sock.sendall(request)
        while b"\r\n\r\n" not in buffer:
            fill(len(buffer) + 1)
        head, _, buffer = buffer.partition(b"\r\n\r\n")
        status = head.split(b" ", 2)[1]
        if status != b"200":
            raise RuntimeError(f"answer {status.decode()}: {head.decode('latin-1')}")
        length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        if length is not None:
            take(int(length[1]))
        elif re.search(rb"(?im)^transfer-encoding:\s*chunked", head):
            while True:
                size = int(line().split(b";")[0], 16)
                take(size)
                line()
                if size == 0:
                    break
        else:
            raise RuntimeError("response without a length")
        return re.search(rb"(?im)^connection:\s*close", head) is None

    timings: list[float] = []
    connect()
    try:
        for i in range(min(200, count) + count):  # the first ones warm up
            start = time.perf_counter()
            keep_alive = exchange()
            if i >= min(200, count):
                timings.append(time.perf_counter() - start)
            if not keep_alive:
                connect()
    finally:
        sock.close()
    return timings


def latency_samples(url: str, count: int) -> list[float]:
    """Seconds per request from the sequential client, run as a separate process."""
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    argv = [sys.executable, __file__, "--latency-client", host, port, PATH, str(count)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"latency client failed:\n{out.stderr}")
    timings: list[float] = json.loads(out.stdout)
    return timings


def measure_latencies(results: Sequence[Result], urls: Sequence[str], requests: int) -> None:
    """Fills in p50/p99. The targets take turns in rounds, so that a change in the load
    other programs put on the machine does not fall on one target only."""
    samples: list[list[float]] = [[] for _ in urls]
    for _ in range(LATENCY_ROUNDS):
        for url, collected in zip(urls, samples, strict=True):
            collected.extend(latency_samples(url, max(1, requests // LATENCY_ROUNDS)))
    for result, collected in zip(results, samples, strict=True):
        cuts = statistics.quantiles(collected, n=100, method="inclusive")
        result.p50_ms, result.p99_ms = cuts[49] * 1e3, cuts[98] * 1e3


@contextlib.contextmanager
def profiling(pid: int, output: Path | None, seconds: float) -> Iterator[None]:
    if output is None:
        yield
        return
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        sys.exit("--profile needs py-spy: pip install py-spy")
    argv = [
        py_spy,
        "record",
        "--pid",
        str(pid),
        "--subprocesses",
        "--nonblocking",
        "--rate",
        "200",
        "--duration",
        str(max(1, round(seconds))),
        "--output",
        str(output),
    ]
    if output.suffix == ".txt":
        argv += ["--format", "raw"]
    spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(0.5)  # let py-spy attach
        yield
    finally:
        try:
            spy.wait(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()


def measure(
    name: str,
    url: str,
    pids: Sequence[int],
    *,
    wrk: str,
    connections: int,
    seconds: float,
    profile: Path | None = None,
) -> Result:
    result = Result(name)
    target = f"{url}{PATH}"
    run_wrk(wrk, target, connections, WARMUP_SECONDS)
    before = sum(cpu_seconds(p) for p in pids)
    with profiling(pids[-1], profile, seconds):
        rps, errors, percentiles = run_wrk(wrk, target, connections, seconds)
    used = sum(cpu_seconds(p) for p in pids) - before
    result.rps, result.errors = rps, errors
    result.wrk_p50_ms = percentiles.get("50", float("nan"))
    result.wrk_p99_ms = percentiles.get("99", float("nan"))
    result.cpu_us = used / (rps * max(1, round(seconds))) * 1e6 if rps else float("nan")
    return result


# --- report ------------------------------------------------------------------------------


def report(results: list[Result], connections: int, seconds: float, requests: int) -> str:
    direct, gateway, auto, nginx, front, *more = results
    lines = [
        f"GET {PATH}: wrk {connections} connections x {seconds:.0f} s; "
        f"sequential client {requests} requests per target, in {LATENCY_ROUNDS} turns",
        "",
        f"{'':38}{'req/s':>9}{'wrk p50':>9}{'wrk p99':>9}{'seq p50':>9}{'seq p99':>9}"
        f"{'CPU/req':>10}{'errors':>8}",
        f"{'':38}{'':>9}{'ms':>9}{'ms':>9}{'ms':>9}{'ms':>9}{'us':>10}{'':>8}",
    ]
    for r in results:
        lines.append(
            f"{r.name:38}{r.rps:9.0f}{r.wrk_p50_ms:9.2f}{r.wrk_p99_ms:9.2f}"
            f"{r.p50_ms:9.3f}{r.p99_ms:9.3f}{r.cpu_us:10.0f}{r.errors:8d}"
        )
    lines.append("")
    lines.append("CPU/req counts the server processes of each row: Synapse, plus the proxy (and")
    lines.append("for (e) the gateway, idle for this path) in front of it.")
    lines.append("")

    def ratio(row: Result, other: Result) -> str:
        return (
            f"{row.name.split(' ', 1)[1]:>26} / {other.name.split(' ', 1)[1]:16}"
            f" throughput {row.rps / other.rps:5.2f}   seq p50 {row.p50_ms / other.p50_ms:5.2f}"
            f"   CPU/req {row.cpu_us / other.cpu_us:5.2f}"
        )

    for row in (front, gateway, auto, *more):
        lines.append(ratio(row, nginx))
    for row in (nginx, front, gateway, auto, *more):
        lines.append(ratio(row, direct))
    for row in more:
        lines.append(ratio(gateway, row))
    lines.append("")
    for row in (nginx, front, gateway, auto, *more):
        lines.append(
            f"{row.name.split(' ', 1)[1]} adds {row.p50_ms - direct.p50_ms:.3f} ms at the median; "
            f"CPU per request {(row.cpu_us - direct.cpu_us) / direct.cpu_us:+.0%} of Synapse's"
        )
    return "\n".join(lines)


# --- main --------------------------------------------------------------------------------


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of wrk per target")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    parser.add_argument("--requests", type=int, default=3000, help="sequential requests")
    parser.add_argument(
        "--upstream-parser",
        choices=("hand-written", "both"),
        default="hand-written",
        help="'both': one more gateway row, with h11 parsing the homeserver's responses",
    )
    parser.add_argument("--profile", type=Path, help="py-spy output for the gateway (.svg/.txt)")
    parser.add_argument("--keep", action="store_true", help="keep the data directory and logs")
    parser.add_argument("--latency-client", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.latency_client:
        host, port, path, count = args.latency_client
        print(json.dumps(latency_client(host, int(port), path, int(count))))
        return 0

    nginx = ensure_debian_tool("nginx", "nginx")
    wrk = ensure_debian_tool("wrk", "wrk")

    signal.signal(signal.SIGTERM, _raise_stop)
    data_dir = Path(tempfile.mkdtemp(prefix="bench-passthrough-"))
    stack_processes: StackProcesses | None = None
    extra: list[ServiceProcess] = []
    try:
        with_h11 = args.upstream_parser == "both"
        gateways = "four gateways" if with_h11 else "three gateways"
        print(f"starting Synapse, {gateways} and two nginx (data in {data_dir}) ...", flush=True)
        stack = prepare_stack(data_dir / "stack", port=free_port(), log_format="json")
        stack_processes = StackProcesses(stack)
        auto_gateway, auto_url = extra_gateway(stack, data_dir / "auto", workers="auto")
        hypercorn_gateway, hypercorn_url = extra_gateway(
            stack, data_dir / "hypercorn", http_server="hypercorn"
        )
        h11_gateway: ServiceProcess | None = None
        if with_h11:
            h11_gateway, h11_url = extra_gateway(
                stack, data_dir / "h11", launcher=Path(__file__).with_name("h11_upstream.py")
            )
        nginx_port, front_port = free_port(), free_port()
        nginx_proc = nginx_process(nginx, data_dir / "nginx", nginx_port, stack.homeserver_url)
        front_proc = front_proxy_process(
            nginx, data_dir / "front", front_port, stack.gateway_config_path
        )
        stack_processes.start()
        others = [auto_gateway, hypercorn_gateway, nginx_proc, front_proc]
        for process in [*others, h11_gateway] if h11_gateway else others:
            extra.append(process)
            process.start()
            process.wait_until_ready(timeout=60)
        synapse_pid = stack_processes.synapse.pid
        gateway_pid = stack_processes.gateway.pid
        assert synapse_pid and gateway_pid
        assert auto_gateway.pid and nginx_proc.pid and front_proc.pid and hypercorn_gateway.pid

        common = {
            "wrk": wrk,
            "connections": args.connections,
            "seconds": args.duration,
        }
        targets = [
            ("(a) Synapse direct", stack.homeserver_url, [synapse_pid], None),
            ("(b) gateway, 1 worker", stack.gateway_url, [synapse_pid, gateway_pid], args.profile),
            ("(c) gateway, auto workers", auto_url, [synapse_pid, auto_gateway.pid], None),
            ("(d) nginx", f"http://127.0.0.1:{nginx_port}", [synapse_pid, nginx_proc.pid], None),
            (
                "(e) nginx + proxy-config",
                f"http://127.0.0.1:{front_port}",
                [synapse_pid, front_proc.pid, gateway_pid],
                None,
            ),
            (
                "(f) gateway on Hypercorn, 1 worker",
                hypercorn_url,
                [synapse_pid, hypercorn_gateway.pid],
                None,
            ),
        ]
        if h11_gateway is not None:
            assert h11_gateway.pid
            targets.append(
                ("(g) gateway, h11 parser", h11_url, [synapse_pid, h11_gateway.pid], None)
            )
        # The h11 row's throughput is measured right after (b)'s, so that a change in the
        # load other programs put on the machine falls on both parsers alike.
        order = list(range(len(targets)))
        if h11_gateway is not None:
            order.insert(2, order.pop())
        measured: dict[int, Result] = {}
        for i in order:
            name, url, pids, profile = targets[i]
            print(f"throughput of {name} ...", flush=True)
            measured[i] = measure(name, url, pids, profile=profile, **common)
        results = [measured[i] for i in range(len(targets))]
        print(f"latency, the {len(targets)} taking turns ...", flush=True)
        measure_latencies(results, [url for _, url, _, _ in targets], args.requests)
        print()
        print(report(results, args.connections, args.duration, args.requests))
        if args.profile:
            print(f"\ngateway profile: {args.profile}")
        return 0
    except (KeyboardInterrupt, _Stop):
        print("\ninterrupted; stopping everything", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            for process in reversed(extra):
                process.stop()
        finally:
            if stack_processes is not None:
                stack_processes.stop()
            if args.keep:
                print(f"logs kept in {data_dir}")
            else:
                shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
