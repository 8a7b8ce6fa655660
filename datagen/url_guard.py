"""The SSRF guard of URL ingest: which URLs may be fetched, and a fetch that goes only where it checked.

Rules, applied to the URL in the list and again to every redirect it leads to:
- the scheme is http or https: always, `allow_private` does not lift it (no file://, ftp://, data:);
- the host is an IP literal or a name that encodes (IDNA) to letters, digits, '-', '_' and dots;
  an empty, unparsable or overlong URL is refused (non-ASCII in the path is percent-encoded, as
  browsers do, so control characters cannot reach the request line);
- every address the host resolves to is globally routable: `ipaddress`'s `is_global`, and not
  multicast or reserved. An IPv6 address that carries an IPv4 one (mapped ::ffff:a.b.c.d, 6to4
  2002::/16, Teredo, NAT64 64:ff9b::/96, compatible ::a.b.c.d) must pass as that IPv4 address too.
  So loopback, private, link-local (169.254.169.254), CGNAT (100.64/10), documentation, benchmark
  and unspecified (0.0.0.0) addresses are refused. `allow_private` lifts this rule only.

`fetch` resolves each hop's host once, checks every address, and connects to a checked address
itself (the Host header and TLS's SNI and certificate check use the name), so a DNS answer that
changes between check and connection (DNS rebinding) cannot move the request. It follows at most
MAX_REDIRECTS redirects, each hop checked again; one deadline bounds the whole fetch (a server that
trickles a byte a second is cut off at `timeout`), and `max_bytes` bounds the body. Proxies
(http_proxy) are not used: a proxy would resolve the name again.
"""

from __future__ import annotations

import http.client
import ipaddress
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote, urljoin, urlsplit

ALLOWED_SCHEMES = ("http", "https")
REFUSED = "refused"  # error_message prefix of every refusal
MAX_REDIRECTS = 5
MAX_URL_LENGTH = 8192
MAX_BYTES = 128 << 20  # an image larger than this is refused, not held in memory
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]  # (ASCII host, port) -> addresses, in preference order
_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?")  # after IDNA: letters, digits, '-', '_' (seen in CDNs)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


class FetchError(Exception):
    """A URL that was refused or could not be fetched; str() is the index's error_message."""


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (and reaches through a relay or translator)."""
    out = [a for a in (ip.ipv4_mapped, ip.sixtofour) if a is not None]
    if ip.teredo is not None:
        out += list(ip.teredo)  # (server, client)
    if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 0xFFFF):
        out.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return out


def is_public(ip: IPAddress | str) -> bool:
    """True when `ip` is globally routable unicast (and so is every IPv4 address it embeds)."""
    ip = ipaddress.ip_address(ip)
    if not ip.is_global or ip.is_multicast or ip.is_reserved or ip.is_unspecified:
        return False
    return all(is_public(v4) for v4 in embedded_ipv4(ip)) if ip.version == 6 else True


def system_resolver(host: str, port: int) -> list[str]:
    """The system's answer for `host`, addresses in getaddrinfo's order, each once."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0].split("%", 1)[0] for info in infos))


@dataclass(frozen=True)
class Target:
    """One checked hop: connect to one of `addresses` (all checked), speak to `host`."""

    url: str
    scheme: str
    host: str  # ASCII (IDNA) host name or IP literal, without brackets
    port: int
    path: str  # path and query, as sent in the request line
    addresses: tuple[str, ...]


def check_url(url: str, allow_private: bool = False, resolve: Resolver | None = None) -> Target:
    """The URL's checked target, or FetchError with the reason it is refused."""
    if not isinstance(url, str) or not url.strip():
        raise FetchError(f"{REFUSED}: empty URL")
    if len(url) > MAX_URL_LENGTH:
        raise FetchError(f"{REFUSED}: URL longer than {MAX_URL_LENGTH} characters ({len(url)})")
    try:
        parts = urlsplit(url.strip())
        scheme = parts.scheme.lower()
        host = parts.hostname
        port = parts.port
    except ValueError as e:
        raise FetchError(f"{REFUSED}: unparsable URL ({e})") from None
    if scheme not in ALLOWED_SCHEMES:
        raise FetchError(f"{REFUSED}: scheme {scheme!r} is not http(s)")
    if not host:
        raise FetchError(f"{REFUSED}: URL has no host")
    port = port or (443 if scheme == "https" else 80)
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is None:
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError as e:
            raise FetchError(f"{REFUSED}: host {host[:100]!r} is not a valid host name ({e})") from None
        if not _HOST_NAME.fullmatch(host):
            raise FetchError(f"{REFUSED}: host {host[:100]!r} is not a valid host name")
    try:
        addresses = [str(literal)] if literal is not None else (resolve or system_resolver)(host, port)
    except (OSError, UnicodeError) as e:
        raise FetchError(f"failed to resolve host {host!r}: {e}") from None
    if not addresses:
        raise FetchError(f"failed to resolve host {host!r}: no address")
    if not allow_private:
        for a in addresses:
            if not is_public(a):
                raise FetchError(
                    f"{REFUSED}: host {host!r} resolves to the non-public address {a} (private, loopback, "
                    "link-local, CGNAT or reserved); pass --allow-private to fetch from internal networks"
                )
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    # as browsers do: non-ASCII, space and control characters percent-encoded (UTF-8), the rest as given
    path = "".join(c if "!" <= c <= "~" else quote(c, safe="") for c in path)
    return Target(url, scheme, host, port, path, tuple(addresses))


def refusal_reason(url: str, allow_private: bool = False, resolve: Resolver | None = None) -> str | None:
    """None when the URL may be fetched, else the reason it is refused (an error message)."""
    try:
        check_url(url, allow_private, resolve)
    except FetchError as e:
        return str(e)
    return None


def open_socket(address: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection to one checked address (tests replace it to see where fetch connects)."""
    return socket.create_connection((address, port), timeout=timeout)


def _connect(t: Target, timeout: float) -> socket.socket:
    err: OSError | None = None
    for address in t.addresses:
        try:
            return open_socket(address, t.port, timeout)
        except OSError as e:
            err = e
    raise err or OSError("no address to connect to")


def tls_context() -> ssl.SSLContext:
    """The TLS settings of every https fetch: the system's CAs, certificate and host name checked."""
    return ssl.create_default_context()


def _shutdown(current: list[socket.socket]) -> None:
    try:
        current[0].shutdown(socket.SHUT_RDWR)  # wakes a recv blocked past the deadline
    except OSError:
        pass


def _one_hop(t: Target, deadline: float, headers: dict, max_bytes: int, on_headers) -> tuple[int, str | None, bytes]:
    """(status, Location, body) of one request to a checked target, all of it before `deadline`."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError
    sock = _connect(t, remaining)
    current = [sock]  # the socket the watchdog ends: the TLS one once the handshake wraps the TCP one
    watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), _shutdown, args=(current,))
    watchdog.daemon = True
    watchdog.start()
    conn = None
    try:
        if t.scheme == "https":
            sock = current[0] = tls_context().wrap_socket(sock, server_hostname=t.host, do_handshake_on_connect=False)
            sock.do_handshake()  # after `current` holds it, so that the deadline covers the handshake too
            conn = http.client.HTTPSConnection(t.host, t.port, timeout=remaining)
        else:
            conn = http.client.HTTPConnection(t.host, t.port, timeout=remaining)
        conn.sock = sock  # already connected to the checked address: http.client never resolves
        conn.request("GET", t.path, headers={**headers, "Connection": "close"})
        resp = conn.getresponse()
        if resp.status in REDIRECT_STATUSES:
            return resp.status, resp.getheader("Location"), b""
        if resp.status >= 400:
            raise FetchError(f"HTTP Error {resp.status}: {resp.reason}")
        if on_headers is not None:
            on_headers(resp.headers)
        length = resp.getheader("Content-Length")
        if length and length.isdigit() and int(length) > max_bytes:
            raise FetchError(f"{REFUSED}: body of {int(length)} bytes is over the limit of {max_bytes}")
        chunks, size = [], 0
        while chunk := resp.read1(1 << 16):
            size += len(chunk)
            if size > max_bytes:
                raise FetchError(f"{REFUSED}: body over the limit of {max_bytes} bytes")
            chunks.append(chunk)
        if time.monotonic() >= deadline:
            raise TimeoutError  # the watchdog ended the read: the body may be cut short
        if length and length.isdigit() and size < int(length):
            raise FetchError(f"incomplete body: {size} of {int(length)} bytes")
        return resp.status, None, b"".join(chunks)
    finally:
        watchdog.cancel()
        if conn is not None:
            conn.close()
        sock.close()


def fetch(
    url: str,
    *,
    timeout: float,
    allow_private: bool = False,
    max_redirects: int = MAX_REDIRECTS,
    max_bytes: int = MAX_BYTES,
    user_agent: str = USER_AGENT,
    resolve: Resolver | None = None,
    on_headers: Callable[[http.client.HTTPMessage], None] | None = None,
) -> bytes:
    """The body at `url`, every hop checked and pinned; FetchError(reason) otherwise, never another error.

    `timeout` is a deadline for the whole fetch, redirects included; `on_headers` sees the final
    answer's headers and may raise FetchError (img2dataset's X-Robots-Tag check)."""
    deadline = time.monotonic() + timeout
    headers = {"User-Agent": user_agent}
    current = url
    try:
        for hop in range(max_redirects + 1):
            target = check_url(current, allow_private, resolve)
            status, location, body = _one_hop(target, deadline, headers, max_bytes, on_headers)
            if location is None and status not in REDIRECT_STATUSES:
                return body
            if not location:
                raise FetchError(f"HTTP {status} redirect without a Location header")
            if hop == max_redirects:
                break
            current = urljoin(current, location.strip())
        raise FetchError(f"{REFUSED}: more than {max_redirects} redirects")
    except FetchError as e:
        if str(e).startswith(REFUSED) and current != url:
            raise FetchError(f"{e} (redirected to {current[:200]})") from None
        raise
    except Exception as e:  # noqa: BLE001 - every failure of one URL is that URL's row
        if isinstance(e, TimeoutError) or time.monotonic() >= deadline:  # "timed out", as urllib said it:
            # a download's timeout, recorded downstream as download_failed (not the caption engine's timeout)
            raise FetchError(f"timed out: no complete answer within {timeout:g}s") from None
        raise FetchError(f"{type(e).__name__}: {e}"[:500]) from None
