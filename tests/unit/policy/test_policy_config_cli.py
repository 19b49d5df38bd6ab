"""``[[policies]]`` parsing and checking, ``gateway policy test`` and ``gateway decisions``."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.policy import (
    PolicyConfigError,
    PolicyEngine,
    check_policies,
    parse_policy_config,
)
from gateway.policy.cli import decisions_main, parse_since, policy_test_main
from gateway.store import open_store
from tests.unit.policy.contexts import FIXTURES, invite

WritePolicy = Callable[[str, str], Path]

# --- parse_policy_config ------------------------------------------------------------------


def test_parse_defaults_and_order(tmp_path: Path) -> None:
    specs = parse_policy_config(
        [
            {"module": "policies.server_rules", "options": {"deny_ip_literals": True}},
            {
                "module": "mine/custom.py",
                "mode": "shadow",
                "on_error": "open",
                "timeout": 1,
                "name": "custom-1",
            },
        ],
        base_dir=tmp_path,
    )
    assert [(s.name, s.module, s.mode, s.on_error, s.timeout, s.key) for s in specs] == [
        ("server_rules", "policies.server_rules", "enforce", "closed", 2.0, "policies[0]"),
        ("custom-1", "mine/custom.py", "shadow", "open", 1.0, "policies[1]"),
    ]
    assert specs[0].options == {"deny_ip_literals": True}
    assert specs[1].base_dir == tmp_path
    assert parse_policy_config(None) == []


@pytest.mark.parametrize(
    ("raw", "problems"),
    [
        (
            {"module": "x"},
            ["policies: must be an array of tables ([[policies]]), got {'module': 'x'}"],
        ),
        (
            [{"module": "policies.server_rules", "mode": "enforcing"}],
            ['policies[0].mode: must be "enforce" or "shadow", got \'enforcing\''],
        ),
        (
            [{"module": "a"}, {"module": "b", "on_error": "ignore"}],
            ['policies[1].on_error: must be "closed" or "open", got \'ignore\''],
        ),
        ([{}], ["policies[0].module: required (a dotted module name or a .py path)"]),
        (
            [{"module": "not a module"}],
            ["policies[0].module: 'not a module' is neither a dotted module name nor a .py path"],
        ),
        (
            [{"module": "a", "timeout": 0}],
            ["policies[0].timeout: must be a number of seconds in (0, 60], got 0"],
        ),
        (
            [{"module": "a", "timeout": True}],
            ["policies[0].timeout: must be a number of seconds in (0, 60], got True"],
        ),
        ([{"module": "a", "options": []}], ["policies[0].options: must be a table, got []"]),
        (
            [{"module": "a", "colour": "red"}],
            [
                "policies[0].colour: unknown key (known: base_dir, mode, module, name, on_error,"
                " options, timeout)"
            ],
        ),
        (
            [{"module": "x.rules"}, {"module": "y.rules"}],
            [
                "policies[1].name: 'rules' is already used by policies[0];"
                " give one of them a distinct name"
            ],
        ),
        (["policies.server_rules"], ["policies[0]: must be a table, got 'policies.server_rules'"]),
    ],
)
def test_parse_errors_name_the_key(raw: Any, problems: list[str]) -> None:
    with pytest.raises(PolicyConfigError) as e:
        parse_policy_config(raw)
    assert e.value.problems == problems


def test_parse_collects_every_problem() -> None:
    with pytest.raises(PolicyConfigError) as e:
        parse_policy_config([{"module": "a", "mode": "x"}, {"module": "b", "timeout": -1}])
    assert [p.split(":")[0] for p in e.value.problems] == [
        "policies[0].mode",
        "policies[1].timeout",
    ]


def test_check_policies_reports_import_and_option_problems(
    write_policy: WritePolicy, tmp_path: Path
) -> None:
    write_policy("nohooks", "X = 1\n")
    write_policy("synchook", "def on_invite(ctx, options):\n    pass\n")
    problems = check_policies(
        [
            {"module": "policies.server_rules", "options": {"deny_origins": "evil"}},
            {"module": "policies.does_not_exist"},
            {"module": "nohooks.py"},
            {"module": "synchook.py"},
            {"module": "policies.min_room_version", "options": {"minimum": "10"}},
        ],
        base_dir=tmp_path,
    )
    assert problems[0] == (
        "policies[0].options.deny_origins: must be a list of non-empty glob strings, got 'evil'"
    )
    assert problems[1].startswith(
        "policies[1].module: cannot import 'policies.does_not_exist': ModuleNotFoundError"
    )
    assert problems[2] == (
        "policies[2].module: 'nohooks.py' defines none of on_invite, on_join, on_knock, on_outbound"
    )
    assert problems[3] == "policies[3].module: synchook.py.on_invite must be an async def"
    assert len(problems) == 4
    assert (
        check_policies([{"module": "policies.min_room_version", "options": {"minimum": 9}}]) == []
    )


# --- gateway policy test ------------------------------------------------------------------

SHIPPED = sorted(p.name for p in FIXTURES.glob("*.json") if p.name != "banlist.json")


def test_every_context_type_has_a_fixture() -> None:
    kinds = {json.loads((FIXTURES / name).read_text())["context"] for name in SHIPPED}
    assert kinds == {"invite", "join", "knock"}


BANLIST = {"files": [str(FIXTURES / "banlist.json")], "invite_action": "drop"}
RULES = {"deny_creator_servers": ["spam.example"], "deny_ip_literals": True}


@pytest.mark.parametrize(
    ("module", "options", "fixture", "expected"),
    [
        ("policies.server_rules", RULES, "invite_v3.json", "deny 403 M_FORBIDDEN: rooms created"),
        ("policies.server_rules", RULES, "invite_v2.json", "allow"),
        ("policies.server_rules", RULES, "join.json", "allow"),
        ("policies.server_rules", RULES, "knock.json", "deny 403 M_FORBIDDEN: origin 203.0.113.9"),
        ("policies.policy_lists", BANLIST, "invite_v3.json", "drop: server spam.example is banned"),
        ("policies.policy_lists", BANLIST, "join.json", "allow"),
        ("policies.min_room_version", {"minimum": "10"}, "knock.json", "deny 400"),
        ("policies.min_room_version", {"minimum": "10"}, "invite_v2.json", "allow"),
        (
            "policies.rate_limit",
            {"invites_per_origin": {"capacity": 1, "per_second": 1}},
            "invite_v3.json",
            "allow",
        ),
    ],
)
def test_policy_test_on_shipped_fixtures(
    module: str, options: dict[str, Any], fixture: str, expected: str
) -> None:
    out = io.StringIO()
    code = policy_test_main(
        [module, "--fixture", str(FIXTURES / fixture), "--options", json.dumps(options)], out=out
    )
    assert code == 0
    assert out.getvalue().startswith(expected), out.getvalue()


def test_policy_test_json_and_expect(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["policies.min_room_version", "--fixture", str(FIXTURES / "knock.json")]
    args += ["--options", '{"minimum": "10"}']
    out = io.StringIO()
    assert policy_test_main([*args, "--json", "--expect", "deny"], out=out) == 0
    assert json.loads(out.getvalue()) == {
        "decision": "deny",
        "errcode": "M_INCOMPATIBLE_ROOM_VERSION",
        "reason": "room version 7 is not accepted here (minimum 10)",
        "status": 400,
    }
    assert policy_test_main([*args, "--expect", "allow"], out=io.StringIO()) == 3
    assert "expected allow, got deny" in capsys.readouterr().err


def test_policy_test_reports_problems(
    write_policy: WritePolicy, capsys: pytest.CaptureFixture[str]
) -> None:
    fixture = str(FIXTURES / "invite_v2.json")
    boom = write_policy("boom", "async def on_invite(ctx, options):\n    raise KeyError('x')\n")
    assert policy_test_main([str(boom), "--fixture", fixture], out=io.StringIO()) == 1
    assert "KeyError" in capsys.readouterr().err

    assert (
        policy_test_main(
            ["policies.server_rules", "--fixture", fixture, "--options", '{"nope": 1}'],
            out=io.StringIO(),
        )
        == 1
    )
    assert "options.nope: unknown option" in capsys.readouterr().err

    dropper = write_policy(
        "dropper",
        "from gateway.policy.api import drop\n"
        "async def on_join(ctx, options):\n    return drop('x')\n",
    )
    join_fixture = str(FIXTURES / "join.json")
    assert policy_test_main([str(dropper), "--fixture", join_fixture], out=io.StringIO()) == 1
    assert "drop, which is for invites only" in capsys.readouterr().err
    out = io.StringIO()
    assert policy_test_main([str(dropper), "--fixture", fixture], out=out) == 0
    assert "has no on_invite hook" in out.getvalue()

    bad = write_policy("bad_fixture", "")
    bad.with_suffix(".json").write_text('{"context": "invite", "fields": {"inviter": "@a:b"}}')
    assert (
        policy_test_main(
            ["policies.server_rules", "--fixture", str(bad.with_suffix(".json"))], out=io.StringIO()
        )
        == 1
    )
    assert "fields: missing" in capsys.readouterr().err


# --- gateway decisions --------------------------------------------------------------------


@dataclass(frozen=True)
class StoreSettings:
    backend: str
    sqlite_path: Path
    postgres_dsn: str = ""


def test_parse_since() -> None:
    assert parse_since("1h", now=10_000) == (10_000 - 3600) * 1000
    assert parse_since("30m", now=10_000) == (10_000 - 1800) * 1000
    assert parse_since("2026-01-01T00:00:00Z") == 1_767_225_600_000
    with pytest.raises(ValueError):
        parse_since("yesterday")


async def test_decisions_lists_audit_rows(tmp_path: Path) -> None:
    settings = StoreSettings("sqlite", tmp_path / "gateway.db")
    store = await open_store("sqlite", sqlite_path=str(settings.sqlite_path))
    try:
        specs = parse_policy_config(
            [
                {"module": "policies.server_rules", "options": {"deny_origins": ["bad.example"]}},
                {"module": "policies.min_room_version", "options": {"minimum": "10"}},
            ]
        )
        engine = PolicyEngine.from_specs(specs, store=store)
        await engine.decide_invite(invite(inviter="@x:bad.example", request_id="d1"))
        await engine.decide_invite(invite(room_version="9", request_id="d2"))
        await engine.decide_invite(invite(request_id="d3"))
    finally:
        await store.aclose()

    # decisions_main runs its own event loop, as the command does: run it in a thread.
    import trio

    async def run(argv: list[str]) -> tuple[int, str]:
        out = io.StringIO()
        code = await trio.to_thread.run_sync(lambda: decisions_main(argv, settings, out=out))
        return code, out.getvalue()

    code, text = await run([])
    assert code == 0
    lines = text.splitlines()
    assert len(lines) == 2
    assert "invite deny 403 M_FORBIDDEN policy=server_rules origin=bad.example" in lines[0]
    assert "@x:bad.example -> @alice:our.example" in lines[0] and "request=d1" in lines[0]
    assert "policy=min_room_version" in lines[1]

    code, text = await run(["--json", "--since", "1h", "--decision", "deny"])
    rows = [json.loads(line) for line in text.splitlines()]
    assert [r["request_id"] for r in rows] == ["d1", "d2"]
    assert rows[1]["errcode"] == "M_INCOMPATIBLE_ROOM_VERSION" and rows[1]["status"] == 400

    code, text = await run(["--decision", "drop"])
    assert code == 0 and text == ""
    code, text = await run(["--since", "soon"])
    assert code == 1
