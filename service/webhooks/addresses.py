"""Where a webhook may be sent: never into the operator's own network (SSRF).

A host is resolved and every address it resolves to is checked; the request is then made
to a checked address (service/webhooks/sender.py connects to that IP, with the Host header
and TLS name of the URL), so a DNS answer that changes between the check and the
connection cannot lead it elsewhere. Refused: loopback, private, shared (CGNAT),
link-local, multicast, unspecified, reserved and documentation ranges, in IPv4 and IPv6,
and IPv6 addresses that carry one of those IPv4 addresses (IPv4-mapped, 6to4, Teredo,
NAT64). Hosts named in FTAAS_WEBHOOK_ALLOWED_HOSTS are trusted as they are.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
NAT64 = ipaddress.ip_network("64:ff9b::/96")
SCHEMES = ("http", "https")


class RefusedAddress(ValueError):
    """The URL leads to an address webhooks may not reach, or to none at all."""


def refused(address: IPAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address):
        embedded = [address.ipv4_mapped, address.sixtofour]
        if address.teredo is not None:
            embedded.extend(address.teredo)
        if address in NAT64:
            embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        if any(inner is not None and refused(inner) for inner in embedded):
            return True
    return (
        not address.is_global
        or address.is_multicast
        or address.is_reserved
        or address.is_loopback
        or address.is_link_local
        or address.is_private
        or address.is_unspecified
    )


def allowed_host(host: str, allowed: tuple[str, ...]) -> bool:
    return host.lower().strip("[]").rstrip(".") in allowed


def checked_addresses(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to, all of them allowed, in the resolver's order;
    RefusedAddress if any is refused or there is none."""
    host = host.strip("[]")
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses: list[IPAddress] = [literal]
    else:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as error:
            raise RefusedAddress(f"the host {host!r} could not be resolved ({error})") from None
        addresses = []
        for info in infos:
            address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
            if address not in addresses:
                addresses.append(address)
    if not addresses:
        raise RefusedAddress(f"the host {host!r} resolves to no address")
    for address in addresses:
        if refused(address):
            raise RefusedAddress(
                f"the host {host!r} resolves to {address}, an address webhooks may not reach "
                "(loopback, private, link-local, multicast or reserved); an operator may allow "
                "the host with FTAAS_WEBHOOK_ALLOWED_HOSTS"
            )
    return [str(address) for address in addresses]


def check_url(url: str, allowed: tuple[str, ...]) -> None:
    """A URL may be registered: http or https, a host, no credentials, and a host that is
    allowed or resolves only to addresses webhooks may reach (RefusedAddress if not)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise RefusedAddress(f"it is not a valid URL ({error})") from None
    if parts.scheme not in SCHEMES:
        raise RefusedAddress("it must be an http or https URL")
    if not parts.hostname:
        raise RefusedAddress("it has no host")
    if parts.username is not None or parts.password is not None:
        raise RefusedAddress("it must not hold credentials")
    if parts.fragment:
        raise RefusedAddress("it must not have a fragment")
    if allowed_host(parts.hostname, allowed):
        return
    checked_addresses(parts.hostname, port or (443 if parts.scheme == "https" else 80))
