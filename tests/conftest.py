"""Shared by every test directory.

The project root goes on ``sys.path`` so tests import their helpers as ``tests.support.…``
whichever way pytest was started (``pytest`` or ``python -m pytest``).
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

pytest_plugins = ["tests.support.stack_fixtures"]
