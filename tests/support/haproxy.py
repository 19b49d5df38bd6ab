"""A real HAProxy (Debian's package) run as a child process, for tests.

``haproxy_binary()`` finds it (or the test fails with :data:`HAPROXY_MISSING`);
``haproxy_service`` writes a complete configuration, a ``global`` and a ``defaults`` section
followed by a snippet (``gateway proxy-config --for haproxy``, say), into its own
directory, checks it with ``haproxy -c`` and returns a ``ServiceProcess`` running HAProxy
in the foreground (``-db``). HAProxy logs one line per request to its standard output,
which ends up in ``console.log``: the backend that served the request, the status and the
request line as received; ``log_entries`` reads them back.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import textwrap
from pathlib import Path

from gateway.demo.synapse import ServiceProcess

__all__ = ["HAPROXY_MISSING", "haproxy_binary", "haproxy_service", "log_entries"]

HAPROXY_MISSING = (
    "haproxy is not installed; the front-proxy tests need Debian's package: "
    "apt-get install -y haproxy (scripts/test.sh installs it when run as root)"
)

#: The log line this configuration writes: ``mxgw-log <backend> <status> "<request line>"``.
_LOG_LINE = re.compile(r'^mxgw-log (\S+) (\S+) "(.*)"$')


def haproxy_binary() -> str | None:
    """The haproxy executable, or None."""
    return shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")


def haproxy_service(
    haproxy: str, directory: Path, snippet: str, *, ready_url: str
) -> ServiceProcess:
    """HAProxy serving ``snippet`` (frontends and backends), not yet started.

    The ``defaults`` section sets no timeouts, so the snippet must set its own; a
    configuration that ``haproxy -c`` finds invalid or warns about is refused here."""
    directory.mkdir(parents=True, exist_ok=True)
    config = textwrap.dedent(
        f"""\
        global
            log stdout format raw local0 info
            pidfile {directory}/haproxy.pid

        defaults
            mode http
            log global
            log-format "mxgw-log %b %ST %{{+Q}}r"

        """
    )
    config_path = directory / "haproxy.cfg"
    config_path.write_text(config + snippet)
    check = subprocess.run(
        [haproxy, "-c", "-f", str(config_path)], capture_output=True, text=True, timeout=30
    )
    if check.returncode != 0 or "Warnings were found" in check.stdout + check.stderr:
        raise AssertionError(f"haproxy -c refused the configuration:\n{check.stdout}{check.stderr}")
    return ServiceProcess(
        "haproxy",
        [haproxy, "-db", "-f", str(config_path)],
        ready_url=ready_url,
        console_path=directory / "console.log",
    )


def log_entries(directory: Path) -> list[tuple[str, str]]:
    """(backend, request line) for each request HAProxy has logged so far, oldest first."""
    path = directory / "console.log"
    if not path.exists():
        return []
    entries = []
    for line in path.read_text(errors="replace").splitlines():
        match = _LOG_LINE.match(line)
        if match:
            entries.append((match[1], match[3]))
    return entries
