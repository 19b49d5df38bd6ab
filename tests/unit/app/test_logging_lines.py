"""Worker processes share standard error: every log event must stay one whole line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

_WRITER = """
import sys
from gateway.logging import configure_logging, get_logger
configure_logging("json", "info", static={"worker": int(sys.argv[1])})
log = get_logger("test")
for i in range(int(sys.argv[2])):
    log.info("event", n=i, filler="x" * int(sys.argv[3]))
"""


def test_events_from_concurrent_processes_never_share_a_line(tmp_path: Path) -> None:
    out = tmp_path / "shared.log"
    count, size = 3000, 1500
    with out.open("ab") as f:
        writers = [
            subprocess.Popen(
                [sys.executable, "-c", _WRITER, str(worker), str(count), str(size)], stderr=f
            )
            for worker in range(3)
        ]
        for w in writers:
            assert w.wait(timeout=120) == 0
    lines = out.read_text(encoding="utf8").splitlines()
    events = [json.loads(line) for line in lines]  # a split line is not JSON
    assert len(events) == 3 * count
    for worker in range(3):
        assert sorted(e["n"] for e in events if e["worker"] == worker) == list(range(count))
