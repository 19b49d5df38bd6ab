"""A real Caddy (Debian's package) run as a child process, for tests.

``caddy_binary()`` finds it (or the test fails with :data:`CADDY_MISSING`); ``caddy_service``
writes a Caddyfile, a global options block followed by a site block (``gateway proxy-config
--for caddy``, say), into its own directory and returns a ``ServiceProcess`` running ``caddy
run`` in the foreground. The global options keep Caddy to itself: no admin endpoint, no
automatic HTTPS (so no certificates, no trust-store changes, no listener on :80), every
listener on loopback, storage and autosaved configuration in that directory. Caddy's log
(JSON, one object a line, in ``caddy.log``) is at debug level, where ``reverse_proxy`` writes
an "upstream roundtrip" entry naming the upstream that answered and the request as received;
``log_entries`` reads them back.
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from pathlib import Path

from gateway.demo.synapse import ServiceProcess

__all__ = ["CADDY_MISSING", "caddy_binary", "caddy_service", "log_entries"]

CADDY_MISSING = (
    "caddy is not installed; the front-proxy tests need Debian's package: "
    "apt-get install -y caddy (scripts/test.sh installs it when run as root)"
)


def caddy_binary() -> str | None:
    """The caddy executable, or None."""
    return shutil.which("caddy") or shutil.which("caddy", path="/usr/bin:/usr/sbin")


def caddy_service(
    caddy: str, directory: Path, site_block: str, *, ready_url: str
) -> ServiceProcess:
    """Caddy serving ``site_block`` (a Caddyfile site block), not yet started."""
    directory.mkdir(parents=True, exist_ok=True)
    options = textwrap.dedent(
        f"""\
        {{
            admin off
            auto_https off
            default_bind 127.0.0.1
            storage file_system {directory}/storage
            debug
            log {{
                output file {directory}/caddy.log
                format json
            }}
        }}

        """
    )
    config_path = directory / "Caddyfile"
    config_path.write_text(options + site_block)
    env = {
        **os.environ,
        "HOME": str(directory),
        "XDG_DATA_HOME": str(directory / "data"),
        "XDG_CONFIG_HOME": str(directory / "config"),
    }
    return ServiceProcess(
        "caddy",
        [caddy, "run", "--adapter", "caddyfile", "--config", str(config_path)],
        ready_url=ready_url,
        console_path=directory / "console.log",
        log_paths=[directory / "caddy.log"],
        env=env,
    )


def log_entries(directory: Path) -> list[tuple[str, str]]:
    """(upstream host:port, request line) for each request Caddy has proxied so far."""
    path = directory / "caddy.log"
    if not path.exists():
        return []
    entries = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line still being written
        if entry.get("msg") != "upstream roundtrip":
            continue
        request = entry["request"]
        request_line = f"{request['method']} {request['uri']} {request['proto']}"
        entries.append((entry["upstream"], request_line))
    return entries
