"""Refuse URLs that point inside the network (SSRF guard) before anything is fetched.

A URL is refused when its scheme is not http(s), or when its host resolves to any private,
loopback, link-local, multicast, reserved or unspecified address (10/8, 127/8, 169.254/16,
::1, fc00::/7, ...). The check resolves the host itself; a host whose DNS answer changes between
this check and the fetch (DNS rebinding) is not covered, so for hostile inputs also run ingest on
a network that cannot reach internal services.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

ALLOWED_SCHEMES = ("http", "https")
REFUSED = "refused"  # error_message prefix of every refusal


def _is_internal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def refusal_reason(url: str, allow_private: bool = False) -> str | None:
    """None when the URL may be fetched, else the reason it is refused (an error message)."""
    if allow_private:
        return None
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        return f"{REFUSED}: unparsable URL ({e})"
    if parts.scheme not in ALLOWED_SCHEMES:
        return f"{REFUSED}: scheme {parts.scheme!r} is not http(s)"
    if not host:
        return f"{REFUSED}: URL has no host"
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except OSError as e:
        return f"failed to resolve host {host!r}: {e}"
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        if _is_internal(ip):
            return (
                f"{REFUSED}: host {host!r} resolves to the private/loopback/link-local address {ip}; "
                "pass --allow-private to fetch from internal networks"
            )
    return None
