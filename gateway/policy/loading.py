"""Policy configuration (the ``[[policies]]`` array of ``gateway.toml``) and module loading.

Each entry::

    [[policies]]
    module = "policies.server_rules"     # dotted name, or a path to a .py file
    name = "server_rules"                # optional, defaults to the module's last part
    mode = "enforce"                     # or "shadow": log and audit, but always allow
    on_error = "closed"                  # or "open": what a hook that fails or is too slow means
    timeout = 2.0                        # seconds per hook call
    options = { deny_origins = ["*.evil.example"] }
    base_dir = "/etc/gateway"            # optional, see below

Relative paths in an entry (a ``.py`` module path, path-valued options) are relative to the
configuration file's directory, like every path in ``gateway.toml``. ``base_dir`` names
another directory for one entry (``gateway demo`` writes it, so a policy taken from the
user's own file keeps meaning what it meant next to that file). Dotted module names are
also looked up there. ``validate_options`` learns the directory by declaring a keyword
parameter ``base_dir`` (see :mod:`gateway.policy.api`).

Problems name the exact key, e.g. ``policies[1].mode: must be "enforce" or "shadow"``.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import inspect
import math
import sys
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gateway.policy.api import OptionsError

__all__ = [
    "HOOK_NAMES",
    "LoadedPolicy",
    "PolicyConfigError",
    "PolicyLoadError",
    "PolicySet",
    "PolicySpec",
    "check_policies",
    "load_policy_set",
    "parse_policy_config",
]

Mode = Literal["enforce", "shadow"]
OnError = Literal["closed", "open"]
DecisionPoint = Literal["invite", "join", "knock", "outbound"]

#: decision point -> the hook a policy module defines for it
HOOK_NAMES: Mapping[DecisionPoint, str] = {
    "invite": "on_invite",
    "join": "on_join",
    "knock": "on_knock",
    "outbound": "on_outbound",
}
DEFAULT_TIMEOUT = 2.0
MAX_TIMEOUT = 60.0
_KEYS = {"module", "name", "options", "mode", "on_error", "timeout", "base_dir"}


class PolicyConfigError(Exception):
    """The policy configuration is invalid; ``problems`` has one ``"key: reason"`` each."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class PolicyLoadError(PolicyConfigError):
    """A policy module could not be imported or rejected its options."""


@dataclass(frozen=True)
class PolicySpec:
    """One validated ``[[policies]]`` entry (not yet imported)."""

    module: str
    name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    mode: Mode = "enforce"
    on_error: OnError = "closed"
    timeout: float = DEFAULT_TIMEOUT
    #: ``policies[N]``: where the entry came from, for messages.
    key: str = "policies[0]"
    #: The directory relative paths (module, path options) are resolved against: the
    #: configuration file's, or the entry's own ``base_dir``. None: the working directory.
    base_dir: Path | None = None


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_path(module: str) -> bool:
    return module.endswith(".py") or "/" in module or "\\" in module


def parse_policy_config(
    raw: Any, *, base_dir: Path | None = None, key: str = "policies"
) -> list[PolicySpec]:
    """Validates the ``[[policies]]`` array (already parsed TOML) into specs, in order.

    Raises :class:`PolicyConfigError` listing every problem. Nothing is imported here; use
    :func:`load_policy_set` (or :func:`check_policies`) for that.
    """
    problems: list[str] = []
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise PolicyConfigError(
            [f"{key}: must be an array of tables ([[{key}]]), got {_show(raw)}"]
        )
    specs: list[PolicySpec] = []
    names: dict[str, str] = {}
    for index, entry in enumerate(raw):
        where = f"{key}[{index}]"
        if not isinstance(entry, Mapping):
            problems.append(f"{where}: must be a table, got {_show(entry)}")
            continue
        for unknown in sorted(set(entry) - _KEYS):
            problems.append(f"{where}.{unknown}: unknown key (known: {', '.join(sorted(_KEYS))})")
        before = len(problems)

        module = entry.get("module")
        if module is None:
            problems.append(f"{where}.module: required (a dotted module name or a .py path)")
        elif not isinstance(module, str) or not module.strip():
            problems.append(f"{where}.module: must be a non-empty string, got {_show(module)}")
        elif not _is_path(module) and not all(part.isidentifier() for part in module.split(".")):
            problems.append(
                f"{where}.module: {module!r} is neither a dotted module name nor a .py path"
            )

        name = entry.get("name")
        if name is None and isinstance(module, str):
            name = Path(module).stem if _is_path(module) else module.rsplit(".", 1)[-1]
        if name is not None and (not isinstance(name, str) or not name):
            problems.append(f"{where}.name: must be a non-empty string, got {_show(name)}")
        elif isinstance(name, str):
            if name in names:
                problems.append(
                    f"{where}.name: {name!r} is already used by {names[name]};"
                    " give one of them a distinct name"
                )
            else:
                names[name] = where

        options = entry.get("options", {})
        if not isinstance(options, Mapping):
            problems.append(f"{where}.options: must be a table, got {_show(options)}")

        mode = entry.get("mode", "enforce")
        if mode not in ("enforce", "shadow"):
            problems.append(f'{where}.mode: must be "enforce" or "shadow", got {_show(mode)}')

        on_error = entry.get("on_error", "closed")
        if on_error not in ("closed", "open"):
            problems.append(f'{where}.on_error: must be "closed" or "open", got {_show(on_error)}')

        timeout = entry.get("timeout", DEFAULT_TIMEOUT)
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not math.isfinite(timeout)
            or not 0 < timeout <= MAX_TIMEOUT
        ):
            problems.append(
                f"{where}.timeout: must be a number of seconds in (0, {MAX_TIMEOUT:g}],"
                f" got {_show(timeout)}"
            )

        entry_dir = base_dir
        raw_dir = entry.get("base_dir")
        if raw_dir is not None:
            if not isinstance(raw_dir, str) or not raw_dir:
                problems.append(
                    f"{where}.base_dir: must be a directory path string, got {_show(raw_dir)}"
                )
            else:
                entry_dir = (base_dir or Path.cwd()) / Path(raw_dir).expanduser()

        if len(problems) == before:
            specs.append(
                PolicySpec(
                    module=str(module),
                    name=str(name),
                    options=dict(options),
                    mode=mode,
                    on_error=on_error,
                    timeout=float(timeout),
                    key=where,
                    base_dir=entry_dir,
                )
            )
    if problems:
        raise PolicyConfigError(problems)
    return specs


# --- loading ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedPolicy:
    """A policy module imported and its options validated."""

    spec: PolicySpec
    module: types.ModuleType
    #: decision point -> hook
    hooks: Mapping[str, Any]
    #: What the hooks receive as ``options``: ``validate_options``'s result, or the table.
    options: Any

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class PolicySet:
    """An immutable, fully loaded chain. The engine swaps whole sets, never edits one."""

    policies: tuple[LoadedPolicy, ...] = ()
    #: Monotonic counter so logs can tell which set decided.
    generation: int = 0

    def for_point(self, point: DecisionPoint) -> tuple[LoadedPolicy, ...]:
        return tuple(p for p in self.policies if point in p.hooks)


def _module_file_name(path: Path) -> str:
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    return f"gateway_policy_file_{path.stem}_{digest}"


def _exec_fresh(name: str, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
    """Runs the module's code into a new module object, so a reload sees the current source.

    The new module replaces ``sys.modules[name]`` only when it ran without error; the old
    module object stays alive for as long as the old policy set refers to its functions.
    """
    module = importlib.util.module_from_spec(spec)
    previous = sys.modules.get(name)
    sys.modules[name] = module
    try:
        origin = spec.origin
        if origin and origin.endswith(".py") and not spec.submodule_search_locations:
            # Compile the source ourselves: a bytecode cache written within the same second
            # as an edit could otherwise hide the edit.
            source = Path(origin).read_bytes()
            exec(compile(source, origin, "exec"), module.__dict__)
        else:
            assert spec.loader is not None
            spec.loader.exec_module(module)
    except BaseException:
        if previous is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = previous
        raise
    return module


#: The directory holding the built-in ``policies`` package (next to ``gateway``).
_BUILTIN_ROOT = Path(__file__).resolve().parent.parent.parent


def _add_search_paths(base_dir: Path | None) -> None:
    """Dotted names are looked up on ``sys.path``, then next to the configuration file, then
    in the directory of the built-in ``policies`` package (which is not installed as a
    distribution package). Appended, so they never shadow an installed module."""
    for directory in (base_dir, _BUILTIN_ROOT):
        if directory is not None and directory.is_dir() and str(directory) not in sys.path:
            sys.path.append(str(directory))


def _import(spec: PolicySpec) -> types.ModuleType:
    if _is_path(spec.module):
        path = Path(spec.module)
        if not path.is_absolute() and spec.base_dir is not None:
            path = spec.base_dir / path
        path = path.resolve()
        if not path.is_file():
            raise FileNotFoundError(f"no such file {str(path)!r}")
        name = _module_file_name(path)
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None:
            raise ImportError(f"cannot load {str(path)!r} as a Python module")
        return _exec_fresh(name, module_spec)
    _add_search_paths(spec.base_dir)
    importlib.invalidate_caches()
    module_spec = importlib.util.find_spec(spec.module)
    if module_spec is None:
        raise ModuleNotFoundError(f"no module named {spec.module!r}")
    return _exec_fresh(spec.module, module_spec)


def _takes_base_dir(validate: Any) -> bool:
    try:
        parameters = inspect.signature(validate).parameters
    except (TypeError, ValueError):
        return False
    parameter = parameters.get("base_dir")
    return parameter is not None and parameter.kind in (
        inspect.Parameter.KEYWORD_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    )


def _load_one(spec: PolicySpec) -> LoadedPolicy:
    try:
        module = _import(spec)
    except Exception as e:
        raise PolicyLoadError(
            [f"{spec.key}.module: cannot import {spec.module!r}: {type(e).__name__}: {e}"]
        ) from e
    hooks: dict[str, Any] = {}
    problems: list[str] = []
    for point, hook_name in HOOK_NAMES.items():
        hook = getattr(module, hook_name, None)
        if hook is None:
            continue
        if not inspect.iscoroutinefunction(hook):
            problems.append(f"{spec.key}.module: {spec.module}.{hook_name} must be an async def")
        else:
            hooks[point] = hook
    if not hooks and not problems:
        problems.append(
            f"{spec.key}.module: {spec.module!r} defines none of {', '.join(HOOK_NAMES.values())}"
        )
    options: Any = dict(spec.options)
    validate = getattr(module, "validate_options", None)
    if validate is not None and not problems:
        try:
            if _takes_base_dir(validate):
                options = validate(dict(spec.options), base_dir=spec.base_dir or Path.cwd())
            else:
                options = validate(dict(spec.options))
            if inspect.isawaitable(options):
                raise TypeError("validate_options must be a plain def, not async def")
        except OptionsError as e:
            where = f"{spec.key}.options.{e.key}" if e.key else f"{spec.key}.options"
            problems.append(f"{where}: {e.message}")
        except Exception as e:
            problems.append(
                f"{spec.key}.options: {spec.module}.validate_options failed:"
                f" {type(e).__name__}: {e}"
            )
    if problems:
        raise PolicyLoadError(problems)
    return LoadedPolicy(spec=spec, module=module, hooks=hooks, options=options)


def load_policy_set(specs: Sequence[PolicySpec], *, generation: int = 0) -> PolicySet:
    """Imports every policy and validates its options; all or nothing.

    Raises :class:`PolicyLoadError` with every problem found.
    """
    loaded: list[LoadedPolicy] = []
    problems: list[str] = []
    for spec in specs:
        try:
            loaded.append(_load_one(spec))
        except PolicyLoadError as e:
            problems.extend(e.problems)
    if problems:
        raise PolicyLoadError(problems)
    return PolicySet(policies=tuple(loaded), generation=generation)


def check_policies(raw: Any, *, base_dir: Path | None = None) -> list[str]:
    """For ``gateway check``: every problem with the ``[[policies]]`` array, including import
    errors and rejected options; empty when the policies would load."""
    try:
        specs = parse_policy_config(raw, base_dir=base_dir)
        load_policy_set(specs)
    except PolicyConfigError as e:
        return e.problems
    return []
