"""Hypothesis strategies for Matrix JSON values and events."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

SAFE_INT = st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1)

json_scalars = st.none() | st.booleans() | SAFE_INT | st.text(max_size=8)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=5)

EVENT_TYPES = [
    "m.room.member",
    "m.room.create",
    "m.room.join_rules",
    "m.room.power_levels",
    "m.room.history_visibility",
    "m.room.aliases",
    "m.room.redaction",
    "m.room.message",
    "org.example.custom",
]

CONTENT_KEYS = [
    "membership",
    "join_authorised_via_users_server",
    "third_party_invite",
    "creator",
    "room_version",
    "join_rule",
    "allow",
    "ban",
    "events",
    "events_default",
    "kick",
    "redact",
    "state_default",
    "users",
    "users_default",
    "invite",
    "notifications",
    "history_visibility",
    "aliases",
    "redacts",
    "body",
    "displayname",
]

EXTRA_TOP_LEVEL = ["origin", "membership", "prev_state", "redacts", "unsigned", "extra", "hashes"]

third_party_invites = st.one_of(
    st.fixed_dictionaries({"signed": json_objects}, optional={"display_name": st.text(max_size=5)}),
    st.fixed_dictionaries({}, optional={"display_name": st.text(max_size=5)}),
    json_scalars,
)


@st.composite
def contents(draw: st.DrawFn) -> dict[str, Any]:
    keys = draw(st.lists(st.sampled_from(CONTENT_KEYS), unique=True, max_size=6))
    content: dict[str, Any] = {}
    for key in keys:
        if key == "third_party_invite":
            content[key] = draw(third_party_invites)
        else:
            content[key] = draw(json_values)
    return content


servers = st.sampled_from(["a.example", "b.example", "c.example:8448"])
localparts = st.sampled_from(["alice", "bob", "carol"])
user_ids = st.builds(lambda lp, s: f"@{lp}:{s}", localparts, servers)


@st.composite
def events(draw: st.DrawFn, *, with_event_id: bool = True) -> dict[str, Any]:
    """A plausible PDU with random optional parts: the fields Synapse needs are present."""
    event: dict[str, Any] = {
        "type": draw(st.sampled_from(EVENT_TYPES)),
        "room_id": "!room:" + draw(servers),
        "sender": draw(user_ids),
        "content": draw(contents()),
        "depth": draw(st.integers(min_value=1, max_value=2**40)),
        "origin_server_ts": draw(st.integers(min_value=0, max_value=2**45)),
        "prev_events": [],
        "auth_events": [],
    }
    if with_event_id:
        event["event_id"] = "$" + draw(st.text("abc", min_size=1, max_size=4)) + ":a.example"
    if draw(st.booleans()):
        event["state_key"] = draw(st.sampled_from(["", "@alice:a.example", "x"]))
    for key in draw(st.lists(st.sampled_from(EXTRA_TOP_LEVEL), unique=True, max_size=4)):
        event[key] = draw(_EXTRA_VALUES.get(key, json_values))
    return event


_EXTRA_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "hashes": st.just({"sha256": "abc"}),
    "unsigned": st.dictionaries(st.sampled_from(["age_ts", "other"]), SAFE_INT, max_size=2),
    "origin": st.just("a.example"),
    "membership": st.sampled_from(["join", "leave"]),
    "prev_state": st.just([]),
    "redacts": st.just("$x:a.example"),
}
