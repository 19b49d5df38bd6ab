"""A seeded generator of hostile requests, as raw bytes for the wire.

Every request is built from a :class:`Target` (who we are, one remote server whose key the
gateway can get, valid bodies to start from, the owned routes) and one ``random.Random``, so
a seed names a run exactly. The classes (``CLASSES``):

``json_malformed``
    truncated, byte-flipped, duplicate keys, NaN, trailing data, empty bodies.
``json_nested``
    arrays and objects nested from 50 to 100,000 levels, alone or inside an event.
``json_huge``
    bodies over ``public.max_body_size`` (declared or sent), long strings, wide arrays.
``json_non_utf8``
    invalid UTF-8, overlong forms, CESU-8 surrogates, UTF-16 with a BOM, escaped lone
    surrogates.
``json_noncanonical``
    valid JSON in any spelling (whitespace, escapes, key order, floats, big integers),
    correctly signed, so it reaches the handler.
``mutated_signed``
    a valid body with fields removed, retyped or replaced, correctly signed.
``xmatrix_forged``
    well-formed headers that lie: another key, another destination, another URI, unknown
    key ids, our own name as origin, several headers with different origins.
``xmatrix_garbage``
    headers that are not X-Matrix: missing and repeated parameters, bad quoting, odd
    bytes, lengths near the head limit.
``path_odd``
    odd IDs and percent-encodings in every owned route's parameters and in passthrough
    paths, signed over exactly those bytes.
``method_wrong``
    other methods, lower case, unknown tokens, bodies on GET.
``passthrough``
    client and federation paths the homeserver answers, with hostile bodies and queries,
    admin and dot-segment paths.
``key_query``
    key queries with odd server names and hostile bodies.
``http_framing``
    Content-Length with Transfer-Encoding, bad chunk sizes, conflicting lengths, bodies
    shorter or longer than declared.
``http_head``
    oversized request lines and headers, bad header syntax, wrong versions, other
    protocols on the port, incomplete heads.
``pipelining``
    several requests in one write, sometimes with a malformed one among them.
"""

from __future__ import annotations

import copy
import json
import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from signedjson.key import decode_signing_key_base64
from signedjson.types import SigningKey
from unpaddedbase64 import encode_base64

from tests.support.remote_server import x_matrix_authorization

CLASSES = (
    "json_malformed",
    "json_nested",
    "json_huge",
    "json_non_utf8",
    "json_noncanonical",
    "mutated_signed",
    "xmatrix_forged",
    "xmatrix_garbage",
    "path_odd",
    "method_wrong",
    "passthrough",
    "key_query",
    "http_framing",
    "http_head",
    "pipelining",
)

#: How often each class is drawn (relative).
WEIGHTS = {
    "json_malformed": 11,
    "json_nested": 6,
    "json_huge": 3,
    "json_non_utf8": 5,
    "json_noncanonical": 8,
    "mutated_signed": 18,
    "xmatrix_forged": 8,
    "xmatrix_garbage": 8,
    "path_odd": 10,
    "method_wrong": 5,
    "passthrough": 6,
    "key_query": 4,
    "http_framing": 6,
    "http_head": 5,
    "pipelining": 5,
}


@dataclass(frozen=True)
class Samples:
    """Valid bodies of one remote room, to be mutated."""

    room_id: str
    #: a v3 invite body (``event``, ``invite_room_state``, ``state``) and its event ID
    v3_invite: dict[str, Any]
    invite_event_id: str
    #: a join and a knock of ``Target.remote_user``, and their event IDs
    join_event: dict[str, Any]
    join_event_id: str
    knock_event: dict[str, Any]
    knock_event_id: str


@dataclass(frozen=True)
class Target:
    """What the generator aims at."""

    #: the Host header of well-formed requests
    host: str
    #: our server name: the X-Matrix destination
    server_name: str
    #: a remote server whose key the gateway can get, and that key
    origin: str
    signing_key: SigningKey
    #: a user of ours (invitee) and a user of the origin
    local_user: str
    remote_user: str
    samples: Samples
    #: the owned routes: (method, template)
    routes: tuple[tuple[str, str], ...]
    #: the gateway's public.max_body_size and public.request_timeout
    max_body_size: int = 1024 * 1024
    request_timeout: float = 60.0
    #: other server names that fail fast when the gateway looks for their keys
    unknown_origins: tuple[str, ...] = ("unknown.invalid", "localhost:1")


@dataclass(frozen=True)
class HostileRequest:
    """One exchange: ``data`` goes on the wire as is."""

    kind: str
    data: bytes
    #: what it aims at, for the figures (a route template, ``passthrough``, ``raw``)
    aim: str
    #: answers expected; with ``malformed_inside`` at least this many (then maybe an error)
    answers: int = 1
    malformed_inside: bool = False
    #: on a connection of its own, closed afterwards
    fresh: bool = False
    #: the client shuts its sending side once ``data`` is out
    half_close: bool = False
    #: HEAD: the answer has no body
    head: bool = False
    #: the body is short of its declared length and the client then waits: the gateway
    #: answers only when ``public.request_timeout`` runs out
    waits_for_timeout: bool = False


# --- pools of odd values -----------------------------------------------------------------

_ODD_SEGMENTS = (
    "",
    "%",
    "%%",
    "%0",
    "%ZZ",
    "%00",
    "%2F",
    "%2f..%2f",
    "%2e%2e",
    "..",
    ".",
    "%FF%FE",
    "%C0%AF",
    "%ED%A0%80",
    "%F4%90%80%80",
    "%E2%80%AE",
    "%F0%9F%98%80",
    "%25",
    "%u0041",
    "%0d%0aX-Injected:%201",
    "%20",
    "+",
    "{roomId}",
    "!",
    "!:",
    "!a:b:c:d",
    "!room%3Aremote.test",
    "@user:remote.test",
    "%40user%3Aremote.test",
    "$event",
    "$" + "A" * 43,
    "!" + "A" * 43,
    "#alias:remote.test",
    "@:remote.test",
    "@user",
    "@user:",
    "@user:[::1]",
    "@user:[::1",
    "@user:remote.test:99999",
    "@user:remote.test:-1",
    "@USER:REMOTE.TEST",
    "@user:1.2.3.4.5",
    "@" + "u" * 300 + ":remote.test",
    "x" * 3000,
    "%41" * 500,
    ";",
    "~",
    "'",
    '"',
    "<script>",
    "\\",
)

_ODD_SERVER_NAMES = (
    "",
    "localhost",
    "localhost:0",
    "localhost:65536",
    "localhost:99999999999",
    "[::1]",
    "[::1",
    "::1",
    "1.2.3",
    "-bad-.example",
    "a..b",
    "a" * 300,
    "UPPER.Example",
    "%2e%2e",
    "%00",
    "%FF",
    "ex ample.org",
    "example.org/../x",
    "😀.example",
)

_METHODS = (
    "GET",
    "PUT",
    "POST",
    "DELETE",
    "PATCH",
    "OPTIONS",
    "HEAD",
    "TRACE",
    "put",
    "get",
    "Put",
    "FOO",
    "PROPFIND",
    "M-SEARCH",
    "X" * 200,
)


def _weird_value(rng: random.Random, depth: int = 0) -> Any:
    choices: list[Callable[[], Any]] = [
        lambda: None,
        lambda: True,
        lambda: False,
        lambda: 0,
        lambda: -1,
        lambda: 2**53,
        lambda: -(2**53) - 1,
        lambda: 2**64,
        lambda: 10**40,
        lambda: 1.5,
        lambda: -0.0,
        lambda: 1e308,
        lambda: "",
        lambda: "x" * rng.choice((1, 255, 256, 4096, 70000)),
        lambda: "\u0000",
        lambda: "\u202e\u200b",
        lambda: "😀" * rng.randint(1, 50),
        lambda: "\ud800",
        lambda: "\udfff\ud800",
        lambda: rng.choice(_ODD_SEGMENTS),
        lambda: [],
        lambda: {},
        lambda: {"": ""},
        lambda: list(range(rng.choice((3, 300, 3000)))),
        lambda: {f"k{i}": i for i in range(rng.choice((3, 300)))},
        lambda: _nested(rng.choice((20, 200)), rng.random() < 0.5),
    ]
    if depth < 2:
        choices.append(lambda: [_weird_value(rng, depth + 1) for _ in range(rng.randint(1, 4))])
        choices.append(
            lambda: {
                rng.choice(("type", "content", "state_key", "", "x")): _weird_value(rng, depth + 1)
            }
        )
    return rng.choice(choices)()


def _nested(depth: int, objects: bool) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value} if objects else [value]
    return value


def _nested_text(depth: int, objects: bool) -> bytes:
    if objects:
        return b'{"a":' * depth + b"1" + b"}" * depth
    return b"[" * depth + b"1" + b"]" * depth


# --- mutation of valid bodies ------------------------------------------------------------


def _containers(value: Any, out: list[Any], limit: int = 400) -> None:
    stack = [value]
    while stack and len(out) < limit:
        item = stack.pop()
        if isinstance(item, dict | list):
            out.append(item)
            stack.extend(item.values() if isinstance(item, dict) else item)


def mutate(rng: random.Random, value: Any, times: int | None = None) -> Any:
    """A deep copy of ``value`` with a few random changes."""
    result = copy.deepcopy(value)
    for _ in range(times if times is not None else rng.randint(1, 4)):
        nodes: list[Any] = []
        _containers(result, nodes)
        if not nodes:
            return _weird_value(rng)
        node = rng.choice(nodes)
        action = rng.random()
        if isinstance(node, dict):
            keys = list(node)
            if keys and action < 0.3:
                del node[rng.choice(keys)]
            elif keys and action < 0.8:
                node[rng.choice(keys)] = _weird_value(rng)
            else:
                node[rng.choice(("type", "state_key", "room_id", "sender", "x", "\u0000", ""))] = (
                    _weird_value(rng)
                )
        else:
            if node and action < 0.3:
                node.pop(rng.randrange(len(node)))
            elif node and action < 0.6:
                node.append(copy.deepcopy(rng.choice(node)))
            elif node and action < 0.8:
                node[rng.randrange(len(node))] = _weird_value(rng)
            else:
                node.append(_weird_value(rng))
    return result


def _dumps(rng: random.Random, value: Any) -> bytes:
    """``value`` as JSON in a random (valid) spelling."""
    ensure_ascii = rng.random() < 0.5
    indent = rng.choice((None, None, 0, 1, 4, "\t"))
    separators = rng.choice(((",", ":"), (", ", ": "), (" ,", " :  ")))
    text = json.dumps(
        value,
        ensure_ascii=ensure_ascii,
        indent=indent,
        separators=separators,
        sort_keys=rng.random() < 0.3,
    )
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: only the escaped spelling exists
        return json.dumps(value, ensure_ascii=True).encode()


# --- building the wire form --------------------------------------------------------------


def wire(
    method: str,
    target: str | bytes,
    headers: Sequence[tuple[str | bytes, str | bytes]] = (),
    body: bytes | None = None,
    *,
    host: str | bytes | None = None,
    version: bytes = b"HTTP/1.1",
    length: bool = True,
) -> bytes:
    """One request as bytes. ``length``: add Content-Length for ``body``."""

    def b(x: str | bytes) -> bytes:
        return x if isinstance(x, bytes) else x.encode("utf-8", "surrogateescape")

    lines = [b(method) + b" " + b(target) + b" " + version]
    if host is not None:
        lines.append(b"Host: " + b(host))
    lines.extend(b(k) + b": " + b(v) for k, v in headers)
    if body is not None and length:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


def chunked(data: bytes, rng: random.Random) -> bytes:
    out = bytearray()
    i = 0
    while i < len(data):
        n = rng.randint(1, max(1, min(len(data) - i, 8192)))
        out += f"{n:x}\r\n".encode() + data[i : i + n] + b"\r\n"
        i += n
    return bytes(out + b"0\r\n\r\n")


@dataclass
class Generator:
    """Builds :class:`HostileRequest` s for one target from one seed."""

    target: Target
    seed: int
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        # A key nobody knows, for forged signatures (from the seed too).
        seed = encode_base64(self.rng.randbytes(32))
        self._stranger_key = decode_signing_key_base64("ed25519", "forged", seed)
        self._names = list(CLASSES)
        self._weights = [WEIGHTS[c] for c in CLASSES]

    # -- requests to owned routes ---------------------------------------------------------

    def _sample_body(self, template: str) -> Any:
        s = self.target.samples
        if "/invite/" in template and ("/v3/" in template or "unstable" in template):
            return s.v3_invite
        if "/v2/invite/" in template:
            return {
                "room_version": s.v3_invite["state"][0]["content"].get("room_version", "1"),
                "event": s.v3_invite["event"],
                "invite_room_state": s.v3_invite["invite_room_state"],
            }
        if "/v1/invite/" in template:
            return s.v3_invite["event"]
        if "send_join" in template:
            return s.join_event
        if "send_knock" in template:
            return s.knock_event
        return None

    def _param(self, name: str, template: str, odd: bool) -> str:
        rng = self.rng
        if odd:
            value = rng.choice(_ODD_SEGMENTS)
            return value if rng.random() < 0.7 else quote(value, safe="")
        s = self.target.samples
        if name == "roomId":
            value = s.room_id
        elif name == "eventId":
            if "send_join" in template:
                value = s.join_event_id
            elif "send_knock" in template:
                value = s.knock_event_id
            else:
                value = s.invite_event_id
        elif name == "userId":
            value = self.target.remote_user
        elif name == "serverName":
            value = self.target.origin
        else:
            value = "x"
        return quote(value, safe="") if rng.random() < 0.9 else quote(value, safe="!@:$")

    def _path(self, template: str, odd_rate: float = 0.0) -> str:
        segments = []
        for segment in template.split("/"):
            if segment.startswith("{") and segment.endswith("}"):
                segments.append(self._param(segment[1:-1], template, self.rng.random() < odd_rate))
            else:
                segments.append(segment)
        path = "/".join(segments)
        if "make_join" in template or "make_knock" in template:
            path += self.rng.choice(("?ver=11", "?ver=10&ver=11&ver=12", "", "?ver=%ZZ&ver="))
        return path

    def _auth(
        self,
        method: str,
        uri: str,
        content: Any,
        *,
        origin: str | None = None,
        key: SigningKey | None = None,
        destination: str | None = None,
    ) -> str:
        """A correct X-Matrix header (or one that only ``key``/``origin`` make wrong); a
        garbage signature when ``content`` has no canonical form."""
        origin = origin or self.target.origin
        try:
            return x_matrix_authorization(
                method=method,
                uri=uri,
                origin=origin,
                destination=destination or self.target.server_name,
                signing_key=key or self.target.signing_key,
                content=content,
            )
        except (ValueError, TypeError, RecursionError, UnicodeError):
            key_id = f"ed25519:{(key or self.target.signing_key).version}"
            return (
                f'X-Matrix origin="{origin}",destination="{self.target.server_name}",'
                f'key="{key_id}",sig="{"A" * 86}"'
            )

    def _owned(self) -> tuple[str, str]:
        return self.rng.choice(self.target.routes)

    def _owned_with_body(self) -> tuple[str, str]:
        with_body = [r for r in self.target.routes if r[0] in ("PUT", "POST")]
        return self.rng.choice(with_body or list(self.target.routes))

    def _signed(
        self,
        kind: str,
        method: str,
        path: str,
        content: Any,
        body: bytes | None,
        aim: str,
        extra_headers: Sequence[tuple[str, str]] = (),
    ) -> HostileRequest:
        auth = self._auth(method, path, content)
        headers = [("Authorization", auth), ("Content-Type", "application/json"), *extra_headers]
        return HostileRequest(
            kind, wire(method, path, headers, body, host=self.target.host), aim=aim
        )

    # -- the classes ----------------------------------------------------------------------

    def json_malformed(self) -> HostileRequest:
        rng = self.rng
        method, template = self._owned_with_body()
        path = self._path(template)
        good = json.dumps(self._sample_body(template) or {"a": [1, 2, 3]}).encode()
        variants: list[Callable[[], bytes]] = [
            lambda: good[: rng.randrange(max(1, len(good)))],
            lambda: good + rng.choice((b"x", b",", b"}", b" {}", b"\x00", b"\n\n[1]")),
            lambda: (
                good[: (i := rng.randrange(max(1, len(good))))]
                + bytes([rng.randrange(256)])
                + good[i + 1 :]
            ),
            lambda: b'{"event":{},"event":{}}',
            lambda: b'{"a":NaN}',
            lambda: b'{"a":Infinity,"b":-Infinity}',
            lambda: b'{"a":1e999999}',
            lambda: b'{"a":01}',
            lambda: b'{"a":-}',
            lambda: b"{'a':1}",
            lambda: b'{"a":1,}',
            lambda: b'{"a":1 /* c */}',
            lambda: b'{"a":"\\uZZZZ"}',
            lambda: b'{"a":"\t\x01"}',
            lambda: b"",
            lambda: b"null",
            lambda: b"true",
            lambda: b'"string"',
            lambda: b"[",
            lambda: b"{" * 3 + b"}",
            lambda: b"\xef\xbb\xbf" + good,
            lambda: good.replace(b'"', b"", 1),
            lambda: b'{"a":"' + b"x" * 1000,
        ]
        body = rng.choice(variants)()
        content: Any = None
        return self._signed("json_malformed", method, path, content, body, template)

    def json_nested(self) -> HostileRequest:
        rng = self.rng
        method, template = self._owned_with_body()
        path = self._path(template)
        depth = rng.choice((50, 500, 900, 950, 990, 1000, 1100, 5000, 100_000))
        objects = rng.random() < 0.5
        placement = rng.random()
        if placement < 0.4:
            text = _nested_text(depth, objects)
            content: Any = _nested(min(depth, 2000), objects) if depth <= 2000 else None
            body = text
        else:
            sample = copy.deepcopy(self._sample_body(template) or {})
            nested = _nested(min(depth, 2000), objects)
            event = sample.get("event") if isinstance(sample.get("event"), dict) else sample
            if placement < 0.7:
                event.setdefault("content", {})["nested"] = nested
            else:
                sample["deep"] = nested
            content = sample
            try:
                body = json.dumps(sample).encode()
            except RecursionError:
                body = _nested_text(depth, objects)
                content = None
        if rng.random() < 0.2:
            body = body[: rng.randrange(max(1, len(body)))]
        return self._signed("json_nested", method, path, content, body, template)

    def json_huge(self) -> HostileRequest:
        rng = self.rng
        method, template = self._owned_with_body()
        path = self._path(template)
        limit = self.target.max_body_size
        # Bodies over the limit are really sent only when that is a few MiB at most (not
        # 50 MiB times hundreds); bodies under it stay within 1 MiB.
        sendable = limit <= 2 * 1024 * 1024
        choice = rng.random()
        if choice < 0.3 or (choice < 0.45 and not sendable):
            # Declared over the limit; only the start is sent (the gateway must not wait
            # for the rest).
            declared = rng.choice((limit + 1, 10 * limit, 2**40, 10**19))
            head = wire(
                method,
                path,
                [
                    ("Authorization", self._auth(method, path, None)),
                    ("Content-Length", str(declared)),
                ],
                None,
                host=self.target.host,
            )
            return HostileRequest(
                "json_huge", head + b'{"a":"' + b"x" * 1000, aim=template, fresh=True
            )
        if choice < 0.45:
            body = b'{"a":"' + b"x" * (limit + rng.randint(1, 4096)) + b'"}'
            return HostileRequest(
                "json_huge",
                wire(method, path, [("Authorization", "X-Matrix x")], body, host=self.target.host),
                aim=template,
                fresh=True,
            )
        sample = copy.deepcopy(self._sample_body(template) or {})
        if choice < 0.65:
            sample["state"] = [copy.deepcopy(sample.get("event", {}))] * rng.choice((150, 2000))
        elif choice < 0.8:
            event = sample.get("event") if isinstance(sample.get("event"), dict) else sample
            size = min(rng.choice((limit // 8, limit // 4, limit - 4096)), 1024 * 1024)
            event.setdefault("content", {})["big"] = "y" * size
        elif choice < 0.9:
            sample["invite_room_state"] = [
                {"type": "m.x", "state_key": str(i)} for i in range(20000)
            ]
        else:
            sample = {f"k{i}": i for i in range(30000)}
        body = json.dumps(sample, separators=(",", ":")).encode()
        if len(body) > limit:
            body = body[:limit]
            sample = None
        return self._signed("json_huge", method, path, sample, body, template)

    def json_non_utf8(self) -> HostileRequest:
        rng = self.rng
        method, template = self._owned_with_body()
        path = self._path(template)
        good = json.dumps(self._sample_body(template) or {"a": "b"}).encode()
        bad = rng.choice(
            (b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80", b"\xe2\x82")
        )
        variants: list[Callable[[], bytes]] = [
            lambda: good.replace(b'"', b'"' + bad, 1),
            lambda: good[:-2] + bad + good[-2:],
            lambda: "\ufeff".encode("utf-16") + json.dumps({"a": "b"}).encode("utf-16-le"),
            lambda: json.dumps({"a": "é"}, ensure_ascii=False).encode("latin-1"),
            lambda: b'{"a":"\\ud800"}',
            lambda: b'{"a":"\\udc00\\ud800"}',
            lambda: b'{"\\ud800":1}',
            lambda: json.dumps({"event": {"content": {"x": "\ud800"}}}).encode(),
        ]
        body = rng.choice(variants)()
        return self._signed("json_non_utf8", method, path, None, body, template)

    def json_noncanonical(self) -> HostileRequest:
        rng = self.rng
        method, template = self._owned_with_body()
        path = self._path(template)
        sample = copy.deepcopy(self._sample_body(template) or {"a": 1})
        event = sample.get("event") if isinstance(sample.get("event"), dict) else sample
        tweak = rng.random()
        if tweak < 0.25:
            event.setdefault("content", {})["n"] = rng.choice(
                (1.0, 1.5, 2**53, 2**60, -(2**63), 1e100, 0.1)
            )
        elif tweak < 0.4:
            event["origin_server_ts"] = rng.choice((1.5, 2**64, -1, "1", None))
        elif tweak < 0.5:
            event.setdefault("content", {})["u"] = "\u00e9\u2028\u2029\U0001f600\u0000"
        body = _dumps(rng, sample)
        return self._signed("json_noncanonical", method, path, sample, body, template)

    def mutated_signed(self) -> HostileRequest:
        method, template = self._owned_with_body()
        path = self._path(template)
        sample = self._sample_body(template) or {"a": 1}
        content = mutate(self.rng, sample)
        body = _dumps(self.rng, content)
        return self._signed("mutated_signed", method, path, content, body, template)

    def xmatrix_forged(self) -> HostileRequest:
        rng = self.rng
        method, template = self._owned()
        path = self._path(template)
        content = self._sample_body(template) if method in ("PUT", "POST") else None
        if content is not None and rng.random() < 0.5:
            content = mutate(rng, content, 1)
        body = json.dumps(content).encode() if content is not None else None
        t = self.target
        variant = rng.randrange(9)
        if variant == 0:
            auths = [self._auth(method, path, content, key=self._stranger_key)]
        elif variant == 1:
            auths = [self._auth(method, path, content, destination="other.example")]
        elif variant == 2:
            auths = [self._auth(method, path + "?x=1", content)]
        elif variant == 3:
            auths = [self._auth("POST" if method != "POST" else "PUT", path, content)]
        elif variant == 4:
            auths = [self._auth(method, path, {"other": True})]
        elif variant == 5:
            auths = [self._auth(method, path, content, origin=t.server_name)]
        elif variant == 6:
            origin = rng.choice(t.unknown_origins)
            auths = [self._auth(method, path, content, origin=origin)]
        elif variant == 7:
            auths = [
                self._auth(method, path, content, origin=rng.choice((t.origin, *t.unknown_origins)))
                for _ in range(rng.randint(2, 7))
            ]
        else:
            good = self._auth(method, path, content)
            auths = [good.replace('key="ed25519:', 'key="ed25519:x')]
        headers = [("Authorization", a) for a in auths]
        headers.append(("Content-Type", "application/json"))
        return HostileRequest(
            "xmatrix_forged", wire(method, path, headers, body, host=t.host), aim=template
        )

    def xmatrix_garbage(self) -> HostileRequest:
        rng = self.rng
        method, template = self._owned()
        path = self._path(template)
        content = self._sample_body(template) if method in ("PUT", "POST") else None
        body = json.dumps(content).encode() if content is not None else None
        t = self.target
        good = self._auth(method, path, content)
        printable = string.printable.encode()
        variants: list[Callable[[], bytes]] = [
            lambda: b"X-Matrix",
            lambda: b"X-Matrix ",
            lambda: b"X-Matrix ,,,",
            lambda: b"X-Matrix origin=",
            lambda: b'X-Matrix origin="',
            lambda: b'X-Matrix origin="a\\',
            lambda: b'X-Matrix origin="a",origin="b",key="ed25519:a",sig="x"',
            lambda: good.encode().replace(b'sig="', b'sig="!!', 1),
            lambda: good.encode().replace(b"origin=", b"origin= ", 1),
            lambda: good.encode().replace(b",", b";"),
            lambda: good.encode().replace(b'"', b""),
            lambda: good.encode().upper(),
            lambda: good.encode()[: rng.randrange(len(good))],
            lambda: good.encode() + b"," + b"x=" * 2000,
            lambda: b'X-Matrix origin="' + bytes(rng.randrange(128, 256) for _ in range(20)) + b'"',
            lambda: b'X-Matrix origin="' + t.origin.encode() + b'",key="ed25519",sig="x"',
            lambda: b'X-Matrix origin="' + t.origin.encode() + b'",key="ed25519:",sig=""',
            lambda: (
                b'X-Matrix origin="'
                + rng.choice(_ODD_SERVER_NAMES).encode()
                + b'",key="a:b",sig="x"'
            ),
            lambda: b"Bearer abc",
            lambda: b"X-Matrixorigin=x",
            lambda: bytes(rng.choice(printable) for _ in range(rng.randint(1, 300))),
            lambda: b"X-Matrix " + b"a" * rng.choice((1000, 8000, 15000)),
        ]
        headers: list[tuple[bytes, bytes]] = [
            (b"Authorization", rng.choice(variants)()) for _ in range(rng.choice((1, 1, 1, 2, 5)))
        ]
        headers = [(k, v.replace(b"\r", b"").replace(b"\n", b"")) for k, v in headers]
        headers.append((b"Content-Type", b"application/json"))
        return HostileRequest(
            "xmatrix_garbage", wire(method, path, headers, body, host=t.host), aim=template
        )

    def path_odd(self) -> HostileRequest:
        rng = self.rng
        if rng.random() < 0.7:
            method, template = self._owned()
            path = self._path(template, odd_rate=0.7)
            aim = template
        else:
            aim = "passthrough"
            method = rng.choice(("GET", "PUT"))
            path = rng.choice(
                (
                    "/_matrix/federation/v1/state/{s}",
                    "/_matrix/federation/v1/event/{s}",
                    "/_matrix/client/v3/rooms/{s}/state",
                    "/_matrix/client/v3/profile/{s}",
                    "/_matrix/media/v3/download/{s}/{s}",
                    "/_matrix/{s}/../federation/v1/version",
                    "/{s}/_matrix/federation/v1/version",
                    "/_matrix/federation/v1/make_join/{s}/{s}/{s}",
                    "/_matrix/federation/v3/invite/{s}/{s}",
                    "/_matrix/federation/v3/invite/",
                    "/_matrix/federation/v3/invite",
                    "/_matrix//federation/v3/invite/{s}",
                    "/_matrix/federation/v3/invite/{s}/",
                    "/_matrix/federation/%76%33/invite/{s}",
                    "/_matrix/%66ederation/v1/send_join/{s}/{s}",
                )
            )
            while "{s}" in path:
                path = path.replace("{s}", rng.choice(_ODD_SEGMENTS), 1)
        if rng.random() < 0.2:
            path += rng.choice(("?", "?&&", "?a=%ZZ", "?" + "a=1&" * 500, "#frag", "?%00=%00"))
        content = self._sample_body(aim) if method in ("PUT", "POST") else None
        body = json.dumps(content).encode() if content is not None else None
        return self._signed("path_odd", method, path, content, body, aim)

    def method_wrong(self) -> HostileRequest:
        rng = self.rng
        real, template = self._owned()
        method = rng.choice([m for m in _METHODS if m != real])
        path = self._path(template)
        content = self._sample_body(template) if rng.random() < 0.5 else None
        body = json.dumps(content).encode() if content is not None else None
        head = method == "HEAD"
        auth = self._auth(method, path, content)
        data = wire(method, path, [("Authorization", auth)], body, host=self.target.host)
        return HostileRequest("method_wrong", data, aim=template, head=head)

    def passthrough(self) -> HostileRequest:
        rng = self.rng
        t = self.target
        method, path = rng.choice(
            (
                ("GET", "/_matrix/federation/v1/version"),
                ("GET", "/_matrix/client/versions"),
                ("GET", "/_matrix/client/v3/sync?since=%ZZ&timeout=-1"),
                ("POST", "/_matrix/client/v3/login"),
                ("PUT", "/_matrix/federation/v1/send/txn1"),
                ("POST", "/_matrix/client/v3/keys/query"),
                ("GET", "/.well-known/matrix/server"),
                ("GET", "/_synapse/client/rendezvous"),
                ("GET", "/_synapse/admin/v1/server_version"),
                ("GET", "/_synapse/admin/../admin/v1/users"),
                ("GET", "/_matrix/../_synapse/admin/v1/server_version"),
                ("GET", "/_matrix/%2e%2e/_synapse/admin/v1/server_version"),
                ("GET", "/_synapse/replication/x"),
                ("GET", "/metrics"),
                ("GET", "/health"),
                ("GET", "/"),
                ("GET", "*"),
                ("OPTIONS", "/_matrix/client/versions"),
                ("DELETE", "/_matrix/client/v3/devices/x"),
            )
        )
        headers: list[tuple[str, str]] = []
        if rng.random() < 0.5:
            headers.append(("Authorization", rng.choice(("Bearer x", "Bearer " + "t" * 5000, ""))))
        if rng.random() < 0.3:
            headers.append(("X-Forwarded-For", "1.2.3.4, " * rng.randint(1, 100)))
        if rng.random() < 0.2:
            headers.append(("Connection", "x-secret, close, keep-alive, upgrade"))
        body = None
        if method in ("POST", "PUT") or rng.random() < 0.2:
            body = rng.choice(
                (
                    json.dumps(
                        mutate(rng, {"pdus": [t.samples.v3_invite["event"]], "edus": []})
                    ).encode(),
                    _nested_text(rng.choice((100, 5000)), rng.random() < 0.5),
                    b"\xff\xfe",
                    b"",
                )
            )
        return HostileRequest(
            "passthrough",
            wire(method, path, headers, body, host=t.host),
            aim="passthrough",
            head=False,
        )

    def key_query(self) -> HostileRequest:
        rng = self.rng
        t = self.target
        choice = rng.random()
        body = None
        if choice < 0.4:
            name = rng.choice((*_ODD_SERVER_NAMES, t.origin, t.server_name))
            method = "GET"
            path = "/_matrix/key/v2/query/" + (quote(name, safe="") if rng.random() < 0.6 else name)
            if rng.random() < 0.3:
                path += rng.choice(("?minimum_valid_until_ts=-1", "?minimum_valid_until_ts=x", "/"))
        elif choice < 0.8:
            method, path = "POST", "/_matrix/key/v2/query"
            query = {"server_keys": {t.origin: {}}}
            body = rng.choice(
                (
                    json.dumps(mutate(rng, query)).encode(),
                    json.dumps({"server_keys": {n: {} for n in _ODD_SERVER_NAMES}}).encode(),
                    _nested_text(rng.choice((100, 3000)), True),
                    b"{",
                    b"\xff",
                )
            )
        else:
            method = rng.choice(("GET", "PUT", "DELETE"))
            path = rng.choice(
                (
                    "/_matrix/key/v2/server",
                    "/_matrix/key/v2/server/ed25519:x",
                    "/_matrix/key/v2/server/",
                    "/_matrix/key/%76%32/server",
                    "/_matrix/key/v2/../v2/server",
                    "/_matrix/key/v1/server",
                    "/_matrix/key/",
                )
            )
        return HostileRequest(
            "key_query", wire(method, path, [], body, host=t.host), aim="key_query"
        )

    def http_framing(self) -> HostileRequest:
        rng = self.rng
        t = self.target
        if rng.random() < 0.5:
            method, template = self._owned_with_body()
            path = self._path(template)
            aim = template
        else:
            method, path, aim = "PUT", "/_matrix/federation/v1/send/txn", "passthrough"
        body = json.dumps({"pdus": [], "edus": []}).encode()
        auth = ("Authorization", self._auth(method, path, None))
        variant = rng.randrange(12)
        half_close = False
        waits = False
        if variant == 0:
            headers = [auth, ("Content-Length", str(len(body))), ("Transfer-Encoding", "chunked")]
            data = wire(method, path, headers, chunked(body, rng), host=t.host, length=False)
        elif variant == 1:
            size = rng.choice((b"zz", b"-1", b"f" * 30, b"5 ;x", b"0x10", b" 5", b"", b"5\x00"))
            data = wire(
                method,
                path,
                [auth, ("Transfer-Encoding", "chunked")],
                size + b"\r\nhello\r\n0\r\n\r\n",
                host=t.host,
                length=False,
            )
        elif variant == 2:
            data = wire(
                method,
                path,
                [auth, ("Transfer-Encoding", "chunked")],
                b"10\r\nshort\r\n0\r\n\r\n",
                host=t.host,
                length=False,
            )
            half_close = True
        elif variant == 3:
            data = wire(
                method,
                path,
                [auth, ("Content-Length", "5"), ("Content-Length", "6")],
                b"hello!",
                host=t.host,
                length=False,
            )
        elif variant == 4:
            value = rng.choice(
                ("abc", "-1", "+5", "5, 5", " 5", "5 5", "0x5", "99999999999999999999")
            )
            data = wire(
                method, path, [auth, ("Content-Length", value)], b"hello", host=t.host, length=False
            )
        elif variant == 5:
            te = rng.choice(
                ("gzip", "chunked, gzip", "identity", "Chunked", "chunked, chunked", "x")
            )
            data = wire(
                method,
                path,
                [auth, ("Transfer-Encoding", te)],
                chunked(body, rng),
                host=t.host,
                length=False,
            )
        elif variant == 6:
            # Shorter than declared, then the client stops sending.
            data = wire(
                method,
                path,
                [auth, ("Content-Length", str(len(body) + 100))],
                body,
                host=t.host,
                length=False,
            )
            half_close = True
        elif variant == 7 and t.request_timeout <= 5:
            data = wire(
                method,
                path,
                [auth, ("Content-Length", str(len(body) + 100))],
                body,
                host=t.host,
                length=False,
            )
            waits = True
        elif variant == 8:
            # Longer than declared: the rest is the next "request".
            data = wire(
                method,
                path,
                [auth, ("Content-Length", "2")],
                b"{}GET /_matrix/federation/v1/version HTTP/1.1\r\nHost: x\r\n\r\n",
                host=t.host,
                length=False,
            )
            return HostileRequest(
                "http_framing", data, aim=aim, answers=1, malformed_inside=True, fresh=True
            )
        elif variant == 9:
            data = wire(
                method,
                path,
                [auth, ("Transfer-Encoding", "chunked"), ("Trailer", "X-T")],
                b"2\r\n{}\r\n0\r\nX-T: 1\r\nBad Trailer\r\n\r\n",
                host=t.host,
                length=False,
            )
        elif variant == 10:
            data = wire(
                method,
                path,
                [auth, ("Expect", "100-continue"), ("Content-Length", str(len(body)))],
                body,
                host=t.host,
                length=False,
            )
        else:
            data = wire(
                method,
                path,
                [auth, ("Transfer-Encoding", "chunked")],
                chunked(body, rng)[:-2],
                host=t.host,
                length=False,
            )
            half_close = True
        return HostileRequest(
            "http_framing",
            data,
            aim=aim,
            fresh=True,
            half_close=half_close,
            waits_for_timeout=waits,
        )

    def http_head(self) -> HostileRequest:
        rng = self.rng
        t = self.target
        method, template = self._owned()
        path = self._path(template)
        host = t.host.encode()
        variants: list[Callable[[], tuple[bytes, bool]]] = [
            lambda: (
                b"GET /"
                + b"a" * rng.choice((8000, 17000, 70000))
                + b" HTTP/1.1\r\nHost: "
                + host
                + b"\r\n\r\n",
                False,
            ),
            lambda: (
                wire("GET", path, [("X-Big", "b" * rng.choice((8000, 17000, 70000)))], host=host),
                False,
            ),
            lambda: (
                wire(
                    "GET",
                    path,
                    [(f"X-H{i}", "v") for i in range(rng.choice((100, 1000, 5000)))],
                    host=host,
                ),
                False,
            ),
            lambda: (b"GET / HTTP/1.1\r\nHost: " + host + b"\r\nNoColon\r\n\r\n", False),
            lambda: (b"GET / HTTP/1.1\r\nHost : " + host + b"\r\n\r\n", False),
            lambda: (b"GET / HTTP/1.1\r\nHost: " + host + b"\r\nX: a\r\n folded\r\n\r\n", False),
            lambda: (b"GET / HTTP/1.1\r\nHost: " + host + b"\r\nX: a\x00b\r\n\r\n", False),
            lambda: (b"GET / HTTP/1.1\rHost: " + host + b"\r\r", True),
            lambda: (
                b"GET /_matrix/federation/v1/version HTTP/1.1\nHost: " + host + b"\n\n",
                False,
            ),
            lambda: (
                b"\r\n\r\nGET /_matrix/federation/v1/version HTTP/1.1\r\nHost: "
                + host
                + b"\r\n\r\n",
                False,
            ),
            lambda: (b"GET /_matrix/federation/v1/version HTTP/1.0\r\n\r\n", False),
            lambda: (b"GET /_matrix/federation/v1/version HTTP/1.1\r\n\r\n", False),
            lambda: (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", False),
            lambda: (b"GET / HTTP/1.1\r\nHost: \xff\xfe\r\n\r\n", False),
            lambda: (bytes.fromhex("160301002a0100002603035a") + bytes(30), True),
            lambda: (bytes(rng.randrange(256) for _ in range(rng.randint(1, 2000))), True),
            lambda: (
                b"GET http://evil.example/_matrix/federation/v1/version HTTP/1.1\r\nHost: "
                + host
                + b"\r\n\r\n",
                False,
            ),
            lambda: (b"OPTIONS * HTTP/1.1\r\nHost: " + host + b"\r\n\r\n", False),
            lambda: (b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n", False),
            lambda: (b"GET / HTTP/1.2\r\nHost: " + host + b"\r\n\r\n", False),
            lambda: (b"GET / HTTP/2.0\r\nHost: " + host + b"\r\n\r\n", False),
            lambda: (b"GET / HTTP/1.1 extra\r\nHost: " + host + b"\r\n\r\n", False),
            lambda: (b"G\x00T / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n", False),
            lambda: (b"GET /a b HTTP/1.1\r\nHost: " + host + b"\r\n\r\n", False),
            lambda: (b"GET /\x7f\x01 HTTP/1.1\r\nHost: " + host + b"\r\n\r\n", False),
            lambda: (b"GET /_matrix/federation/v1/version HTTP/1.1\r\nHost: " + host, True),
            lambda: (b"GET /_matrix/federation/v1/ver", True),
            lambda: (b"Foo Bar: x\r\n\r\n", False),
            lambda: (
                wire(
                    "GET",
                    "/_matrix/client/versions",
                    [
                        ("Upgrade", "websocket"),
                        ("Connection", "Upgrade"),
                        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                        ("Sec-WebSocket-Version", "13"),
                    ],
                    host=host,
                ),
                False,
            ),
            lambda: (
                wire(
                    "GET",
                    "/_matrix/client/versions",
                    [
                        ("Upgrade", "h2c"),
                        ("Connection", "Upgrade, HTTP2-Settings"),
                        ("HTTP2-Settings", "AAMAAABkAAQAAP__"),
                    ],
                    host=host,
                ),
                False,
            ),
            lambda: (
                wire(method, path, [("Content-Type", "application/json\x80")], b"{}", host=host),
                False,
            ),
        ]
        if rng.random() < 0.03:
            # HTTP/2 with prior knowledge: the built-in server refuses it (400); Hypercorn
            # switches protocol and waits for frames. Either way the gateway goes on serving.
            return HostileRequest(
                "http_head", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", aim="raw", answers=0, fresh=True
            )
        data, half_close = rng.choice(variants)()
        return HostileRequest("http_head", data, aim="raw", fresh=True, half_close=half_close)

    def pipelining(self) -> HostileRequest:
        rng = self.rng
        t = self.target
        n = rng.randint(2, 6)
        parts: list[bytes] = []
        malformed_at = rng.randrange(n) if rng.random() < 0.3 else None
        for i in range(n):
            if i == malformed_at:
                parts.append(
                    rng.choice((b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nX\r\n\r\n", b"\x00\x01"))
                )
                break
            kind = rng.randrange(4)
            if kind == 0:
                parts.append(wire("GET", "/_matrix/federation/v1/version", host=t.host))
            elif kind == 1:
                parts.append(wire("GET", "/_matrix/client/versions", host=t.host))
            elif kind == 2:
                method, template = self._owned_with_body()
                path = self._path(template)
                content = mutate(rng, self._sample_body(template) or {"a": 1}, 1)
                body = json.dumps(content).encode()
                parts.append(
                    wire(
                        method,
                        path,
                        [("Authorization", self._auth(method, path, content))],
                        body,
                        host=t.host,
                    )
                )
            else:
                parts.append(
                    wire("POST", "/_matrix/key/v2/query", [], b'{"server_keys":{}}', host=t.host)
                )
        answers = malformed_at if malformed_at is not None else n
        return HostileRequest(
            "pipelining",
            b"".join(parts),
            aim="pipeline",
            answers=answers,
            malformed_inside=malformed_at is not None,
            fresh=True,
        )

    # -- drawing --------------------------------------------------------------------------

    def one(self, kind: str | None = None) -> HostileRequest:
        kind = kind or self.rng.choices(self._names, self._weights)[0]
        built: HostileRequest = getattr(self, kind)()
        return built

    def many(self, count: int) -> list[HostileRequest]:
        return [self.one() for _ in range(count)]


def generate(target: Target, count: int, seed: int) -> list[HostileRequest]:
    """``count`` hostile requests for ``target``; the same seed gives the same requests
    (signatures included: ed25519 is deterministic)."""
    return Generator(target, seed).many(count)
