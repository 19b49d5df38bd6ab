"""A real nginx (Debian's package) run as a child process, for tests and benchmarks.

``nginx_binary()`` finds it (or fails with how to install it); ``nginx_service`` writes a
complete ``nginx.conf`` around an ``http``-context snippet (``gateway proxy-config --for
nginx``, say) into its own prefix directory and returns a ``ServiceProcess`` running nginx
in the foreground (``daemon off``), its pid file, temp files and logs in that directory.
The access log (``access.log``) has one line per request: the request line as sent, the
status and the upstream address that answered (``-`` when nginx answered itself).
"""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

from gateway.demo.synapse import ServiceProcess

__all__ = ["NGINX_MISSING", "access_log_lines", "nginx_binary", "nginx_service"]

NGINX_MISSING = (
    "nginx is not installed; the front-proxy tests and bench/passthrough.py need Debian's "
    "package: apt-get install -y nginx (scripts/test.sh installs it when run as root)"
)

#: One access-log line: ``<upstream> <status> <request line>``.
_LOG_FORMAT = "'$upstream_addr $status \"$request\"'"


def nginx_binary() -> str | None:
    """The nginx executable, or None."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")


def nginx_service(
    nginx: str, directory: Path, http_snippet: str, *, ready_url: str, workers: int = 1
) -> ServiceProcess:
    """nginx serving ``http_snippet`` (the inside of ``http { }``), not yet started.

    ``directory`` must be reachable by nginx's worker user when nginx runs as root (a
    ``tempfile.mkdtemp`` directory is; it is made world-readable here)."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    (directory / "snippet.conf").write_text(http_snippet)
    config = textwrap.dedent(
        f"""\
        daemon off;
        master_process on;
        worker_processes {workers};
        pid {directory}/nginx.pid;
        error_log {directory}/error.log warn;
        events {{ worker_connections 1024; }}
        http {{
            log_format mxgw_test {_LOG_FORMAT};
            access_log {directory}/access.log mxgw_test;
            client_body_temp_path {directory}/client_body;
            proxy_temp_path {directory}/proxy;
            fastcgi_temp_path {directory}/fastcgi;
            uwsgi_temp_path {directory}/uwsgi;
            scgi_temp_path {directory}/scgi;
            include {directory}/snippet.conf;
        }}
        """
    )
    config_path = directory / "nginx.conf"
    config_path.write_text(config)
    return ServiceProcess(
        "nginx",
        [nginx, "-p", str(directory), "-e", str(directory / "error.log"), "-c", str(config_path)],
        ready_url=ready_url,
        console_path=directory / "console.log",
        log_paths=[directory / "error.log"],
    )


def access_log_lines(directory: Path) -> list[str]:
    path = directory / "access.log"
    return path.read_text(errors="replace").splitlines() if path.exists() else []
