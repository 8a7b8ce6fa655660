"""The SSRF guard: address rules, schemes, every redirect hop checked, the checked address is the one
connected to (DNS rebinding), one deadline per fetch. Real local HTTP servers (tests/datagen/conftest.py);
public hosts are a resolver stub plus a redirected connection (named as such: no internet here)."""

import time

import pytest

from datagen import url_guard
from datagen.url_guard import FetchError, fetch, is_public, refusal_reason

PUBLIC_V4 = "93.184.215.14"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x.jpg",
        "http://localhost:8000/a.png",
        "http://10.1.2.3/a",
        "http://192.168.0.1/a",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/a",
        "http://0.0.0.0/a",
        "http://[::ffff:10.0.0.1]/a",
        "http://100.64.0.1/a",
        "http://[2002:7f00:1::]/a",
    ],
)
def test_internal_hosts_refused(url):
    reason = refusal_reason(url)
    assert reason.startswith("refused: host") and "--allow-private" in reason
    assert refusal_reason(url, allow_private=True) is None


@pytest.mark.parametrize(
    "address",
    [
        "100.64.0.1",  # CGNAT: not private, not global
        "2002:7f00:1::",  # 6to4 of 127.0.0.1
        "2002:a00:1::1",  # 6to4 of 10.0.0.1
        "::ffff:127.0.0.1",  # IPv4-mapped
        "::ffff:169.254.169.254",
        "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo (client 127.0.0.1)
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "::7f00:1",  # IPv4-compatible 127.0.0.1
        "fc00::1",  # unique local
        "fe80::1",  # link-local
        "169.254.169.254",  # cloud metadata
        "0.0.0.0",
        "::",
        "127.0.0.1",
        "::1",
        "10.0.0.1",
        "172.16.0.1",
        "192.168.1.1",
        "192.0.2.1",  # documentation
        "198.18.0.1",  # benchmarking
        "224.0.0.1",  # multicast (is_global in Python, still refused)
        "ff02::1",
        "255.255.255.255",
        "240.0.0.1",
    ],
)
def test_non_public_addresses(address):
    assert not is_public(address)
    host = f"[{address}]" if ":" in address else address
    assert refusal_reason(f"http://{host}/a.jpg").startswith("refused: host")


@pytest.mark.parametrize("address", [PUBLIC_V4, "8.8.8.8", "2606:4700:4700::1111", "2002:5db8:d70e::1"])
def test_public_addresses(address):
    assert is_public(address)  # the last one is 6to4 of a public IPv4 address
    host = f"[{address}]" if ":" in address else address
    assert refusal_reason(f"http://{host}/a.jpg") is None  # an IP literal needs no DNS


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.com/a.jpg",
        "gopher://x/",
        "data:image/png;base64,AA",
        "javascript:alert(1)",
        "//no-scheme/a.png",
        "/etc/passwd",
    ],
)
@pytest.mark.parametrize("allow_private", [False, True])
def test_only_http_and_https_even_with_allow_private(url, allow_private):
    assert refusal_reason(url, allow_private=allow_private).startswith("refused: scheme")


@pytest.mark.parametrize(
    "url",
    [
        "http://" + "a" * 64 + ".com/x.jpg",
        "http://a..b/x.jpg",
        "http://[::1/x",
        "http://h:99999/x",
        "",
        None,
        "http://x/" + "a" * 10_000,
        "http:///x.jpg",
    ],
)
def test_malformed_urls_are_refused_not_raised(url):
    reason = refusal_reason(url, allow_private=True)
    assert reason is not None and reason.startswith("refused"), reason
    with pytest.raises(FetchError):
        fetch(url, timeout=1, allow_private=True)


def test_redirects_are_checked_at_every_hop(local_web):
    a, b = local_web
    to = f"{a.url}/to?u="
    # allow_private: another local address is fine, file:// and ftp:// never
    assert fetch(to + f"{b.url}/img/x.png", timeout=5, allow_private=True).startswith(b"\x89PNG")
    for target, scheme in [
        ("file:///etc/passwd", "file"),
        ("ftp://127.0.0.1/x.png", "ftp"),
        ("gopher://127.0.0.1/", "gopher"),
    ]:
        with pytest.raises(FetchError, match=f"refused: scheme '{scheme}'.*redirected to"):
            fetch(to + target, timeout=5, allow_private=True)
    with pytest.raises(FetchError, match="more than 5 redirects"):
        fetch(f"{a.url}/loop", timeout=5, allow_private=True)
    # without it, the first hop to 127.0.0.1 is refused: nothing reaches the server
    hits = len(a.hits)
    with pytest.raises(FetchError, match="refused: host '127.0.0.1'"):
        fetch(to + f"{b.url}/img/x.png", timeout=5)
    assert len(a.hits) == hits


class FakePublicNetwork:
    """STAND-IN for the internet (none here): names resolve through a stub, and a connection to a
    public address is carried to a local server; records every (address, port) connected to."""

    def __init__(self, monkeypatch, answers: dict[str, list[list[str]]], route: dict[str, str]):
        self.answers = {h: list(a) for h, a in answers.items()}
        self.route = route  # public address -> local address that plays it
        self.resolved: list[str] = []
        self.connected: list[tuple[str, int]] = []
        real_open = url_guard.open_socket

        def open_socket(address, port, timeout):
            self.connected.append((address, port))
            return real_open(self.route.get(address, address), port, timeout)

        monkeypatch.setattr(url_guard, "open_socket", open_socket)

    def resolve(self, host: str, port: int) -> list[str]:
        self.resolved.append(host)
        answers = self.answers[host]
        return answers.pop(0) if len(answers) > 1 else answers[0]


def test_public_host_redirecting_inside_is_refused_at_the_second_hop(local_web, monkeypatch):
    a, b = local_web
    port = int(a.url.rsplit(":", 1)[1])
    net = FakePublicNetwork(monkeypatch, {"images.example": [[PUBLIC_V4]]}, {PUBLIC_V4: "127.0.0.1"})
    url = f"http://images.example:{port}/to?u={b.url}/img/secret.png"
    with pytest.raises(FetchError, match=r"refused: host '127\.0\.0\.2'.*redirected to"):
        fetch(url, timeout=5, resolve=net.resolve)
    assert net.connected == [(PUBLIC_V4, port)] and b.hits == []  # the internal server saw nothing
    assert a.hosts[-1] == f"images.example:{port}"  # the Host header names the host, not the address
    # a redirect to a public name is followed, and checked again
    url = f"http://images.example:{port}/to?u=http://images.example:{port}/img/ok.png"
    assert fetch(url, timeout=5, resolve=net.resolve).startswith(b"\x89PNG")


def test_dns_rebinding_connects_to_the_checked_address(local_web, monkeypatch):
    a, b = local_web
    port = int(a.url.rsplit(":", 1)[1])
    # the name answers a public address first (checked), then the internal one: the fetch must
    # connect to the first answer, never resolve again for the connection
    net = FakePublicNetwork(monkeypatch, {"rebind.example": [[PUBLIC_V4], ["127.0.0.2"]]}, {PUBLIC_V4: "127.0.0.1"})
    assert fetch(f"http://rebind.example:{port}/img/a.png", timeout=5, resolve=net.resolve).startswith(b"\x89PNG")
    assert net.resolved == ["rebind.example"] and net.connected == [(PUBLIC_V4, port)]
    assert b.hits == []
    # a name with any internal address among its answers is refused before connecting
    net = FakePublicNetwork(monkeypatch, {"mixed.example": [[PUBLIC_V4, "10.0.0.1"]]}, {PUBLIC_V4: "127.0.0.1"})
    with pytest.raises(FetchError, match="non-public address 10.0.0.1"):
        fetch(f"http://mixed.example:{port}/img/a.png", timeout=5, resolve=net.resolve)
    assert net.connected == []


def test_the_timeout_is_a_deadline_for_the_whole_fetch(local_web):
    a, _ = local_web
    t0 = time.monotonic()
    with pytest.raises(FetchError, match="timed out"):
        fetch(f"{a.url}/trickle", timeout=1.0, allow_private=True)  # ~25 s at a byte per 0.2 s
    assert time.monotonic() - t0 < 3


def test_http_errors_and_size_limit(local_web):
    a, _ = local_web
    with pytest.raises(FetchError, match="HTTP Error 404"):
        fetch(f"{a.url}/missing", timeout=5, allow_private=True)
    with pytest.raises(FetchError, match="over the limit"):
        fetch(f"{a.url}/img/x.png", timeout=5, allow_private=True, max_bytes=100)


def test_https_is_pinned_to_the_checked_address_with_the_name_for_sni_and_certificate(tls_server, monkeypatch):
    import ssl

    server, cert = tls_server
    port = int(server.url.rsplit(":", 1)[1])

    def trust_the_test_certificate() -> ssl.SSLContext:
        return ssl.create_default_context(cadata=cert.decode())

    monkeypatch.setattr(url_guard, "tls_context", trust_the_test_certificate)
    net = FakePublicNetwork(monkeypatch, {"images.example": [[PUBLIC_V4], ["127.0.0.2"]]}, {PUBLIC_V4: "127.0.0.1"})
    # the certificate names images.example only: the handshake succeeds because SNI and the check use the name
    assert fetch(f"https://images.example:{port}/img/a.png", timeout=5, resolve=net.resolve).startswith(b"\x89PNG")
    assert net.connected == [(PUBLIC_V4, port)] and server.hosts[-1] == f"images.example:{port}"
    with pytest.raises(FetchError, match="SSLCertVerificationError"):  # another name, same server: refused
        fetch(f"https://other.example:{port}/img/a.png", timeout=5, resolve=lambda h, p: [PUBLIC_V4])
    t0 = time.monotonic()
    with pytest.raises(FetchError, match="timed out"):  # the deadline holds over TLS too
        fetch(f"https://images.example:{port}/trickle", timeout=1.0, resolve=lambda h, p: [PUBLIC_V4])
    assert time.monotonic() - t0 < 3
