"""Sends :class:`~tests.robustness.hostile.HostileRequest` s over raw TCP and counts what
comes back.

A small HTTP/1.1 response reader of our own: a general client would refuse to send most of
these requests, and would hide resets and cut-short answers behind its own retries. Each
worker keeps one connection alive across well-formed requests (the gateway must keep a
reused connection in sync after every kind of answer); requests marked ``fresh`` get a
connection of their own.

Outcomes of one exchange:

``answered``   every expected answer arrived, complete
``closed``     the gateway closed the connection before answering (cleanly)
``reset``      the connection was reset (or broke) before every answer arrived
``timeout``    nothing within the time allowed
``cut_short``  an answer started but ended before its declared end
"""

from __future__ import annotations

import errno
import json
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import trio

from tests.robustness.hostile import HostileRequest

_MAX_HEAD = 1024 * 1024
_KEEP_BODY = 256 * 1024


class _Eof(Exception):
    pass


class _CutShort(Exception):
    pass


@dataclass
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    closes: bool

    @property
    def matrix_error(self) -> bool:
        """Whether the body is a Matrix error (an object with a string ``errcode``)."""
        try:
            data: Any = json.loads(self.body)
        except ValueError:
            return False
        return isinstance(data, dict) and isinstance(data.get("errcode"), str)


class _Reader:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.eof = False

    async def _fill(self) -> None:
        if self.eof:
            raise _Eof()
        data = await self.stream.receive_some(65536)
        if not data:
            self.eof = True
            raise _Eof()
        self.buf += data

    async def _exactly(self, n: int, keep: bytearray) -> None:
        while n > 0:
            if not self.buf:
                try:
                    await self._fill()
                except _Eof:
                    raise _CutShort() from None
            take = min(n, len(self.buf))
            if len(keep) < _KEEP_BODY:
                keep += self.buf[: min(take, _KEEP_BODY - len(keep))]
            del self.buf[:take]
            n -= take

    async def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            try:
                await self._fill()
            except _Eof:
                raise _CutShort() from None
        line, _, rest = bytes(self.buf).partition(b"\r\n")
        self.buf = bytearray(rest)
        return line

    async def answer(self, head: bool) -> Answer:
        """The next final answer (1xx answers are skipped). Raises _Eof when the connection
        ends before any byte of it, _CutShort when it ends inside it."""
        while True:
            started = bool(self.buf)
            while b"\r\n\r\n" not in self.buf:
                if len(self.buf) > _MAX_HEAD:
                    raise _CutShort()
                try:
                    await self._fill()
                except _Eof:
                    if started or self.buf:
                        raise _CutShort() from None
                    raise
                started = True
            raw_head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
            self.buf = bytearray(rest)
            lines = raw_head.split(b"\r\n")
            parts = lines[0].split(b" ", 2)
            try:
                status = int(parts[1])
            except (IndexError, ValueError):
                raise _CutShort() from None
            headers = []
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers.append((name.strip().lower(), value.strip()))
            if 100 <= status < 200 and status != 101:
                continue
            break
        values = dict(headers)
        closes = b"close" in values.get(b"connection", b"").lower()
        body = bytearray()
        if head or status in (204, 304) or status == 101:
            pass
        elif b"chunked" in values.get(b"transfer-encoding", b"").lower():
            while True:
                size_line = await self._line()
                try:
                    size = int(size_line.split(b";")[0], 16)
                except ValueError:
                    raise _CutShort() from None
                if size == 0:
                    while await self._line():
                        pass
                    break
                await self._exactly(size, body)
                await self._line()
        elif b"content-length" in values:
            try:
                length = int(values[b"content-length"])
            except ValueError:
                raise _CutShort() from None
            await self._exactly(length, body)
        else:
            closes = True
            while True:
                body += self.buf[: max(0, _KEEP_BODY - len(body))]
                self.buf.clear()
                try:
                    await self._fill()
                except _Eof:
                    break
        return Answer(status, headers, bytes(body), closes)


@dataclass
class Figures:
    """What a run of hostile requests came to."""

    requests: int = 0
    answers: int = 0
    seconds: float = 0.0
    by_class: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    #: (class, outcome) for every exchange that did not end ``answered``
    failures: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: (class, status) of every 5xx answer
    server_errors: Counter[tuple[str, int]] = field(default_factory=Counter)
    #: 4xx/5xx answers of the gateway's own routes without a Matrix error body, by class
    non_matrix_errors: Counter[str] = field(default_factory=Counter)
    #: a few examples of each failure, for the report: (class, outcome/status, first bytes)
    examples: list[tuple[str, str, bytes]] = field(default_factory=list)

    @property
    def resets(self) -> int:
        return self.outcomes["reset"]

    @property
    def timeouts(self) -> int:
        return self.outcomes["timeout"]

    @property
    def internal_errors(self) -> int:
        """500 answers: the gateway itself failed."""
        return sum(n for (_, status), n in self.server_errors.items() if status == 500)

    @property
    def five_hundreds(self) -> int:
        return sum(self.server_errors.values())

    def _example(self, kind: str, what: str, data: bytes) -> None:
        if sum(1 for e in self.examples if e[:2] == (kind, what)) < 3 and len(self.examples) < 60:
            self.examples.append((kind, what, data[:300]))

    def report(self) -> str:
        lines = [
            f"requests sent: {self.requests} in {self.seconds:.1f} s "
            f"({self.requests / max(self.seconds, 1e-9):.0f}/s), answers: {self.answers}",
            "by class: " + ", ".join(f"{k} {v}" for k, v in sorted(self.by_class.items())),
            "statuses: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items())),
            "outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items())),
            f"5xx: {self.five_hundreds} (500: {self.internal_errors}), resets: {self.resets}, "
            f"timeouts: {self.timeouts}, closed without an answer: {self.outcomes['closed']}, "
            f"cut short: {self.outcomes['cut_short']}",
        ]
        if self.server_errors:
            lines.append(
                "5xx by class: "
                + ", ".join(f"{k}/{s} {n}" for (k, s), n in sorted(self.server_errors.items()))
            )
        if self.failures:
            lines.append(
                "not answered, by class: "
                + ", ".join(f"{k}/{o} {n}" for (k, o), n in sorted(self.failures.items()))
            )
        if self.non_matrix_errors:
            lines.append(
                "errors without a Matrix body (gateway routes): "
                + ", ".join(f"{k} {n}" for k, n in sorted(self.non_matrix_errors.items()))
            )
        return "\n".join(lines)


def _is_reset(error: BaseException) -> bool:
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ConnectionResetError | BrokenPipeError):
            return True
        if isinstance(cause, OSError) and cause.errno in (errno.ECONNRESET, errno.EPIPE):
            return True
        cause = cause.__cause__ or cause.__context__
    return isinstance(error, trio.BrokenResourceError)


class _Worker:
    def __init__(self, host: str, port: int, figures: Figures, timeout: float) -> None:
        self.host = host
        self.port = port
        self.figures = figures
        self.timeout = timeout
        self.stream: trio.SocketStream | None = None
        self.reader: _Reader | None = None

    async def _close(self) -> None:
        if self.stream is not None:
            with trio.CancelScope(shield=True):
                await self.stream.aclose()
        self.stream = None
        self.reader = None

    async def _connect(self) -> tuple[trio.SocketStream, _Reader]:
        if self.stream is None or self.reader is None:
            self.stream = await trio.open_tcp_stream(self.host, self.port)
            self.reader = _Reader(self.stream)
        return self.stream, self.reader

    async def exchange(self, request: HostileRequest, seconds: float) -> tuple[str, list[Answer]]:
        if request.fresh:
            await self._close()
        reused = self.stream is not None
        answers: list[Answer] = []
        outcome = "answered"
        with trio.move_on_after(seconds) as scope:
            try:
                stream, reader = await self._connect()
                try:
                    await stream.send_all(request.data)
                except trio.BrokenResourceError:
                    # The gateway may stop reading once it has answered (a body over the
                    # limit); what it sent is still to be read.
                    pass
                if request.half_close:
                    try:
                        await stream.send_eof()
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                wanted = request.answers
                while len(answers) < wanted or (request.malformed_inside and not reader.eof):
                    try:
                        answer = await reader.answer(request.head)
                    except _Eof:
                        break
                    answers.append(answer)
                    if answer.closes:
                        break
                if len(answers) < wanted and not (answers and answers[-1].closes):
                    # (Pipelined requests after an answer that announced the close are
                    # rightly left unanswered.)
                    outcome = "closed"
            except _CutShort:
                outcome = "cut_short"
            except (OSError, trio.BrokenResourceError) as e:
                outcome = "reset" if _is_reset(e) else f"error:{type(e).__name__}"
        if scope.cancelled_caught:
            outcome = "timeout" if len(answers) < request.answers else "answered"
        if outcome == "closed" and reused and not answers:
            # A kept-alive connection the gateway had already closed: try once afresh.
            await self._close()
            return await self.exchange(
                HostileRequest(**{**request.__dict__, "fresh": True}), seconds
            )
        if (
            request.fresh
            or outcome != "answered"
            or not answers
            or answers[-1].closes
            or request.malformed_inside
        ):
            await self._close()
        return outcome, answers

    async def run(self, requests: trio.MemoryReceiveChannel[HostileRequest]) -> None:
        async for request in requests:
            await self.one(request)
        await self._close()

    async def one(self, request: HostileRequest) -> None:
        f = self.figures
        outcome, answers = await self.exchange(request, self.timeout)
        f.requests += 1
        f.by_class[request.kind] += 1
        f.outcomes[outcome] += 1
        f.answers += len(answers)
        if outcome != "answered":
            f.failures[(request.kind, outcome)] += 1
            f._example(request.kind, outcome, request.data)
        for answer in answers:
            f.statuses[answer.status] += 1
            if answer.status >= 500:
                f.server_errors[(request.kind, answer.status)] += 1
                f._example(request.kind, str(answer.status), request.data + b"\n=> " + answer.body)
            if (
                answer.status >= 400
                and request.aim not in ("raw", "passthrough", "pipeline")
                and answer.body
                and not answer.matrix_error
            ):
                f.non_matrix_errors[request.kind] += 1
                f._example(request.kind, f"not Matrix JSON {answer.status}", answer.body)


async def send_all(
    host: str,
    port: int,
    requests: Iterable[HostileRequest],
    *,
    concurrency: int = 16,
    exchange_seconds: float = 15.0,
) -> Figures:
    """Sends every request (``concurrency`` at a time) and returns the figures.
    ``exchange_seconds`` bounds each exchange."""
    figures = Figures()
    started = time.perf_counter()
    send, receive = trio.open_memory_channel[HostileRequest](0)
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(_Worker(host, port, figures, exchange_seconds).run, receive.clone())
        # Requests that keep a connection busy until the gateway's request timeout runs out
        # go on connections of their own, next to the workers.
        waiting = trio.CapacityLimiter(256)

        async def wait_one(request: HostileRequest) -> None:
            async with waiting:
                worker = _Worker(host, port, figures, exchange_seconds)
                await worker.one(request)
                await worker._close()

        async with send:
            for request in requests:
                if request.waits_for_timeout:
                    nursery.start_soon(wait_one, request)
                else:
                    await send.send(request)
        await receive.aclose()
    figures.seconds = time.perf_counter() - started
    return figures


def summary_lines(figures: Figures, *, examples: bool = True) -> str:
    """The report, then (with ``examples``) a few requests of each failure and 5xx."""
    lines = [figures.report()]
    for kind, what, data in figures.examples if examples else ():
        lines.append(f"  e.g. {kind} {what}: {data!r}")
    return "\n".join(lines)
