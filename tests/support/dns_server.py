"""A small authoritative DNS server on loopback UDP, answering from a table of test records.

Usage (inside a Trio test)::

    server = LoopbackDnsServer({("_matrix-fed._tcp.example.test", "SRV"): ["10 5 8448 a.test."]})
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        resolver = server.resolver()   # a dnspython asyncresolver pointed at it
        ...
        nursery.cancel_scope.cancel()

Names without any record get NXDOMAIN; a known name without the asked type gets an empty
answer (NoAnswer). ``queries`` records every (name, type) asked, for assertions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import dns.asyncresolver
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import trio


class LoopbackDnsServer:
    def __init__(self, records: Mapping[tuple[str, str], Iterable[str]] | None = None) -> None:
        self.records: dict[tuple[str, str], list[str]] = {}
        for (name, rdtype), values in (records or {}).items():
            self.add(name, rdtype, *values)
        self.queries: list[tuple[str, str]] = []
        self.port = 0

    def add(self, name: str, rdtype: str, *values: str) -> None:
        key = (name.lower().rstrip("."), rdtype.upper())
        self.records.setdefault(key, []).extend(values)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        with sock:
            await sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
            task_status.started(self.port)
            while True:
                data, peer = await sock.recvfrom(4096)
                try:
                    query = dns.message.from_wire(data)
                except Exception:
                    continue
                await sock.sendto(self._answer(query).to_wire(), peer)

    def _answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        for question in query.question:
            name = question.name.to_text(omit_final_dot=True).lower()
            rdtype = dns.rdatatype.to_text(question.rdtype)
            self.queries.append((name, rdtype))
            if not any(n == name for n, _ in self.records):
                response.set_rcode(dns.rcode.NXDOMAIN)
                continue
            values = self.records.get((name, rdtype), [])
            if values:
                response.answer.append(
                    dns.rrset.from_text_list(question.name, 60, "IN", rdtype, values)
                )
        return response

    def resolver(self) -> dns.asyncresolver.Resolver:
        """A dnspython resolver that asks only this server."""
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = self.port
        resolver.timeout = 2.0
        resolver.lifetime = 2.0
        return resolver
