"""The pytest example of ``policies/README.md`` runs as written and passes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[3] / "policies" / "README.md"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.DOTALL | re.MULTILINE)


def test_the_readme_pytest_example_passes(tmp_path: Path) -> None:
    blocks = _python_blocks(README.read_text(encoding="utf8"))
    # The policy the example tests: section 3's version of mypolicies/block_servers.py.
    (policy,) = [
        b for b in blocks if "def validate_options(options: Mapping[str, Any]) -> GlobSet" in b
    ]
    (test,) = [b for b in blocks if "async def test_" in b]
    (tmp_path / "mypolicies").mkdir()
    (tmp_path / "mypolicies" / "block_servers.py").write_text(policy, encoding="utf8")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_block_servers.py").write_text(test, encoding="utf8")
    # An empty configuration file keeps this repository's pytest settings (trio_mode) out.
    (tmp_path / "pytest.ini").write_text("[pytest]\n", encoding="utf8")

    result = subprocess.run(
        [sys.executable, "-m", "pytest", "tests", "-p", "no:cacheprovider", "-q"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
    assert "skipped" not in result.stdout and "warning" not in result.stdout.lower()
