"""What the client and the server side share: the syntax of a message head and the chunked
transfer coding (RFC 9112 §§2-7).

Both sides are strict where leniency lets two parsers disagree about where a message ends:
no bare CR or LF inside a line, no obs-fold, no whitespace before a field's colon, chunk
sizes in plain hexadecimal only.
"""

from __future__ import annotations

import re

__all__ = [
    "BAD_TARGET",
    "BAD_VALUE",
    "MAX_HEAD",
    "NO_BODY_STATUS",
    "READ_SIZE",
    "TOKEN",
    "ChunkedDecoder",
    "FramingError",
    "Headers",
    "parse_fields",
]

#: Header lists as ASGI has them: lower-case names, raw byte values, in order.
Headers = list[tuple[bytes, bytes]]

#: Longest message head accepted, start line and fields together.
MAX_HEAD = 64 * 1024
#: How much one read from a connection asks for.
READ_SIZE = 64 * 1024
#: Answers that never have a body, whatever their fields say (RFC 9110 §§15.3.5, 15.4.5).
NO_BODY_STATUS = frozenset({204, 304})

# What must never appear inside a request target or a header (RFC 9112 §3.2, RFC 9110 §5.5).
BAD_TARGET = re.compile(rb"[\x00-\x20\x7f]")
BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
TOKEN = re.compile(_TOKEN)
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_QUOTED = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
# Chunk extensions (RFC 9112 §7.1.1), checked though nobody needs them, then skipped.
# Stricter than the grammar in one place, as h11 is: no whitespace between the size and
# the first ";".
_BWS = rb"[ \t]*"
_EXTENSION = rb";%s%s(?:%s=%s(?:%s|%s))?" % (_BWS, _TOKEN, _BWS, _BWS, _TOKEN, _QUOTED)
_CHUNK_EXTENSIONS = re.compile(rb"(?:%s(?:%s%s)*)?" % (_EXTENSION, _BWS, _EXTENSION))
# A chunk-size line: the size, then maybe extensions.
_MAX_CHUNK_LINE = 1024


class FramingError(Exception):
    """The bytes break HTTP/1.1's message syntax."""


def parse_fields(lines: list[bytes]) -> Headers:
    """The header fields of a head (its lines after the start line), names lower-cased and
    values without surrounding whitespace. Raises :class:`FramingError`."""
    headers: Headers = []
    for line in lines:
        name, colon, value = line.partition(b":")
        value = value.strip(b" \t")
        if not colon or not TOKEN.fullmatch(name) or BAD_VALUE.search(value):
            raise FramingError("malformed header field")
        headers.append((name.lower(), value))
    return headers


class ChunkedDecoder:
    """Takes a chunked body out of a buffer as its bytes arrive.

    :meth:`take` removes what it decodes from the buffer and leaves whatever follows the
    body (the next message) in place; ``done`` turns True once the last chunk and any
    trailer fields have been consumed. Trailer fields are checked, then discarded.
    """

    __slots__ = ("_chunk_end", "_remaining", "done")

    def __init__(self) -> None:
        self.done = False
        self._remaining = 0  # data bytes left in the current chunk
        self._chunk_end = False  # the CRLF after a chunk's data is still due

    def take(self, buffer: bytearray) -> bytes:
        """The body bytes decodable from ``buffer`` now (maybe b""). Raises
        :class:`FramingError`."""
        out = bytearray()
        while not self.done:
            if self._remaining:
                piece = buffer[: self._remaining]
                out += piece
                del buffer[: len(piece)]
                self._remaining -= len(piece)
                if self._remaining:
                    break
                self._chunk_end = True
            if self._chunk_end:
                if len(buffer) < 2:
                    break
                if buffer[:2] != b"\r\n":
                    raise FramingError("chunk data longer than its size")
                del buffer[:2]
                self._chunk_end = False
            end = buffer.find(b"\r\n", 0, _MAX_CHUNK_LINE + 2)
            if end < 0:
                if len(buffer) > _MAX_CHUNK_LINE:
                    raise FramingError("chunk size line too long")
                break
            line = bytes(buffer[:end])
            size_match = _CHUNK_SIZE.match(line)
            if size_match is None or not _CHUNK_EXTENSIONS.fullmatch(line, size_match.end()):
                raise FramingError("malformed chunk size or extension")
            size_text = size_match.group()
            size = int(size_text, 16)
            if size:
                del buffer[: end + 2]
                self._remaining = size
                continue
            # The last chunk: trailer fields (rarely sent) end with an empty line.
            if buffer[end : end + 4] == b"\r\n\r\n":
                del buffer[: end + 4]
            else:
                trailers_end = buffer.find(b"\r\n\r\n", end)
                if trailers_end < 0:
                    if len(buffer) > MAX_HEAD:
                        raise FramingError("trailer fields too long")
                    break
                # Discarded, but only if well-formed: a stray CR or LF in them is where two
                # parsers could disagree about where the message ends.
                parse_fields(bytes(buffer[end + 2 : trailers_end]).split(b"\r\n"))
                del buffer[: trailers_end + 4]
            self.done = True
        return bytes(out)
