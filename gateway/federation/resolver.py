"""DNS lookups used by server discovery, behind a small interface tests can point anywhere."""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import dns.asyncbackend
import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
import structlog

from .errors import DiscoveryError

log = structlog.get_logger(__name__)

#: Names answered without DNS, as the system resolver does from its hosts file.
DEFAULT_STATIC_HOSTS: Mapping[str, Sequence[str]] = {"localhost": ("127.0.0.1", "::1")}


@dataclass(frozen=True, slots=True)
class SrvRecord:
    priority: int
    weight: int
    port: int
    target: str


class Resolver(Protocol):
    async def resolve_srv(self, name: str) -> list[SrvRecord]:
        """SRV records of ``name`` in the order to try them; empty if there are none."""
        ...

    async def resolve_addresses(self, host: str) -> list[str]:
        """IPv6 then IPv4 addresses of ``host`` (CNAMEs followed).

        Raises :class:`DiscoveryError` if the name has no address.
        """
        ...


def order_srv_records(records: Sequence[SrvRecord]) -> list[SrvRecord]:
    """RFC 2782 order: lowest priority first, weighted random order within a priority."""
    ordered: list[SrvRecord] = []
    for priority in sorted({r.priority for r in records}):
        pool = [r for r in records if r.priority == priority]
        while pool:
            total = sum(r.weight for r in pool)
            if total == 0:
                chosen = pool[0]
            else:
                point = random.randint(1, total)
                running = 0
                chosen = pool[-1]
                for r in pool:
                    running += r.weight
                    if running >= point:
                        chosen = r
                        break
            ordered.append(chosen)
            pool.remove(chosen)
    return ordered


class DnspythonResolver:
    """:class:`Resolver` on dnspython's asynchronous resolver with its Trio backend."""

    def __init__(
        self,
        resolver: dns.asyncresolver.Resolver | None = None,
        *,
        timeout: float = 10.0,
        static_hosts: Mapping[str, Sequence[str]] = DEFAULT_STATIC_HOSTS,
    ) -> None:
        self._resolver = resolver if resolver is not None else dns.asyncresolver.Resolver()
        self._timeout = timeout
        self._static_hosts = {k.lower(): tuple(v) for k, v in static_hosts.items()}
        self._backend = dns.asyncbackend.get_backend("trio")

    async def _query(self, name: str, rdtype: dns.rdatatype.RdataType) -> dns.resolver.Answer:
        return await self._resolver.resolve(
            name, rdtype, lifetime=self._timeout, backend=self._backend, search=False
        )

    async def resolve_srv(self, name: str) -> list[SrvRecord]:
        try:
            answer = await self._query(name, dns.rdatatype.SRV)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException as e:
            # A failed SRV lookup is treated as "no SRV record", as for a missing one.
            log.info("srv_lookup_failed", name=name, error=str(e))
            return []
        records = [
            SrvRecord(
                priority=int(rr.priority),
                weight=int(rr.weight),
                port=int(rr.port),
                # The root name "." as target means "no service here" (RFC 2782): kept as "".
                target="" if rr.target == dns.name.root else rr.target.to_text(True),
            )
            for rr in answer
        ]
        return order_srv_records(records)

    async def resolve_addresses(self, host: str) -> list[str]:
        try:
            return [str(ipaddress.ip_address(host))]
        except ValueError:
            pass
        static = self._static_hosts.get(host.lower().rstrip("."))
        if static is not None:
            return list(static)
        addresses: list[str] = []
        errors: list[str] = []
        for rdtype in (dns.rdatatype.AAAA, dns.rdatatype.A):
            try:
                answer = await self._query(host, rdtype)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except dns.exception.DNSException as e:
                errors.append(str(e))
                continue
            addresses.extend(rr.address for rr in answer)
        if not addresses:
            detail = f": {'; '.join(errors)}" if errors else ""
            raise DiscoveryError(f"{host} has no IP address{detail}")
        return addresses
