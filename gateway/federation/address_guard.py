"""The outbound address guard: which IP addresses the gateway may connect to.

A peer chooses the names the gateway resolves (its server name, its ``.well-known``
delegation, its SRV records), so without this guard it could make the gateway fetch from
inside our network. Every address is checked after DNS resolution and before connecting.
The vocabulary is Synapse's: ``ip_range_blacklist`` and ``ip_range_whitelist``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from .errors import AddressRefused

__all__ = ["DEFAULT_IP_RANGE_BLACKLIST", "AddressGuard", "AddressRefused"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Private, loopback, link-local, CGNAT, multicast, documentation and reserved ranges.
DEFAULT_IP_RANGE_BLACKLIST: tuple[str, ...] = (
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "192.0.0.0/24",
    "169.254.0.0/16",
    "192.88.99.0/24",
    "198.18.0.0/15",
    "192.0.2.0/24",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "0.0.0.0/8",
    "240.0.0.0/4",
    "::1/128",
    "fe80::/10",
    "fc00::/7",
    "2001:db8::/32",
    "ff00::/8",
    "fec0::/10",
    "::/128",
)


def _networks(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def _unwrap(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 address stands for, when it embeds one.

    ``::ffff:127.0.0.1`` reaches loopback just as ``127.0.0.1`` does, so it is checked as
    the IPv4 address (and likewise NAT64 ``64:ff9b::/96`` and 6to4 ``2002::/16``).
    """
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.sixtofour is not None:
            return address.sixtofour
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class AddressGuard:
    """Refuses blacklisted addresses unless a whitelist range covers them."""

    def __init__(
        self,
        ip_range_blacklist: Iterable[str] = DEFAULT_IP_RANGE_BLACKLIST,
        ip_range_whitelist: Iterable[str] = (),
    ) -> None:
        """Raises ``ValueError`` for a malformed CIDR (configuration error)."""
        self._blacklist = _networks(ip_range_blacklist)
        self._whitelist = _networks(ip_range_whitelist)

    def is_allowed(self, address: str | IPAddress) -> bool:
        try:
            self.check(address)
        except AddressRefused:
            return False
        return True

    def check(self, address: str | IPAddress) -> IPAddress:
        """Return the parsed address, or raise :class:`AddressRefused`."""
        try:
            ip = ipaddress.ip_address(address) if isinstance(address, str) else address
        except ValueError:
            raise AddressRefused(str(address), "not an IP address") from None
        candidates = {ip, _unwrap(ip)}
        if any(c in net for c in candidates for net in self._whitelist):
            return ip
        for net in self._blacklist:
            if any(c in net for c in candidates):
                raise AddressRefused(str(ip), f"in blacklisted range {net}")
        return ip
