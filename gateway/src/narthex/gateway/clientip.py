"""The client's address behind trusted proxies: X-Forwarded-For believed only from them."""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

from starlette.types import Scope

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network
# What a request without a socket peer (a test transport, a Unix socket) is keyed by.
UNKNOWN = "unknown"


def parse_address(text: str) -> Address | None:
    """One X-Forwarded-For entry as an address, or None when it is not one.

    Tolerates what real proxies write besides a bare address: `[v6]`, `[v6]:port` and
    `v4:port`. An IPv4-mapped IPv6 address is its IPv4 address, so that a dual-stack
    listener's `::ffff:10.0.0.1` matches a trusted `10.0.0.0/8`.
    """
    text = text.strip()
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        text = host
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
        if not port.isdigit():
            return None
        text = host
    try:
        address = ip_address(text)
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_trusted(address: Address, trusted: Sequence[Network]) -> bool:
    # `in` is False across versions (an IPv4 address is never inside an IPv6 network).
    return any(address in network for network in trusted)


def _forwarded_for(scope: Scope) -> list[str]:
    """Every X-Forwarded-For entry, in order: repeated headers form one list (RFC 9110 5.3)."""
    entries: list[str] = []
    for name, value in scope["headers"]:
        if name == b"x-forwarded-for":
            entries.extend(value.decode("latin-1").split(","))
    return entries


def forwarded_chain(scope: Scope, trusted: Sequence[Network]) -> list[str]:
    """The hops this request came through as far as they can be believed: the client
    first, then each trusted proxy, the socket peer last (a single entry, the peer,
    when the peer is not a trusted proxy)."""
    client = scope.get("client")
    peer_text: str = client[0] if client else UNKNOWN
    if not trusted:
        return [peer_text]
    peer = parse_address(peer_text)
    if peer is None or not is_trusted(peer, trusted):
        # Anyone can write X-Forwarded-For: only a trusted proxy's word counts.
        return [peer_text]
    chain = [str(peer)]
    # From the right: each trusted hop vouches for the entry to its left; the first
    # untrusted address is the client. Entries left of it are the client's own claims.
    for entry in reversed(_forwarded_for(scope)):
        hop = parse_address(entry)
        if hop is None:
            # The trusted hop to its right wrote something that is not an address: that
            # hop, the last one we can believe, is as far back as the chain goes.
            break
        chain.append(str(hop))
        if not is_trusted(hop, trusted):
            break
    chain.reverse()
    return chain


def client_ip(scope: Scope, trusted: Sequence[Network]) -> str:
    """The address to hold a request's client to: the socket peer, or, when the peer is
    a trusted proxy, the rightmost untrusted X-Forwarded-For entry."""
    return forwarded_chain(scope, trusted)[0]
