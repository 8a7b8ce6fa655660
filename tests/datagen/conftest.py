"""A small in-process web of local HTTP servers for the SSRF tests: images, redirects, a trickle, a host echo.

Routes (any server of the web):
    /img/NAME.png        a small PNG
    /to?u=URL            302 redirect to URL (any scheme, any host)
    /loop                302 redirect to itself
    /trickle             a PNG, one byte every 0.2 s
    /host                the Host header it received, as text
Each server counts the requests it saw (`hits`), so a test can prove that nothing reached it.
"""

from __future__ import annotations

import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image


def png_bytes(colour=(10, 120, 230), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


class LocalServer:
    def __init__(self, host: str = "127.0.0.1", tls=None):
        self.hits: list[str] = []
        self.hosts: list[str] = []
        self.httpd = ThreadingHTTPServer((host, 0), self._handler())
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"{'https' if tls else 'http'}://{host}:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(server):  # noqa: N805 - closes over the LocalServer
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: bytes = b"", headers: dict | None = None, trickle: float = 0) -> None:
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    if trickle:
                        for i in range(len(body)):
                            self.wfile.write(body[i : i + 1])
                            self.wfile.flush()
                            time.sleep(trickle)
                    else:
                        self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_GET(self):  # noqa: N802
                server.hits.append(self.path)
                server.hosts.append(self.headers.get("Host", ""))
                parts = urlsplit(self.path)
                if parts.path.startswith("/img/"):
                    self._send(200, png_bytes(), {"Content-Type": "image/png"})
                elif parts.path == "/to":  # the target's UTF-8 bytes as they are, as careless servers send them
                    location = parse_qs(parts.query)["u"][0].encode("utf-8", "replace").decode("latin-1")
                    self._send(302, b"", {"Location": location})
                elif parts.path == "/loop":
                    self._send(302, b"", {"Location": "/loop"})
                elif parts.path == "/trickle":
                    self._send(200, png_bytes(), {"Content-Type": "image/png"}, trickle=0.2)
                elif parts.path == "/host":
                    self._send(200, self.headers.get("Host", "").encode())
                else:
                    self._send(404, b"not found")

        return Handler


@pytest.fixture
def local_web():
    """Two servers on two loopback addresses: `a` (127.0.0.1) and `b` (127.0.0.2, the "internal" one)."""
    a, b = LocalServer("127.0.0.1"), LocalServer("127.0.0.2")
    yield a, b
    a.close()
    b.close()


def self_signed(name: str) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) for `name`, made here (no CA, no network)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@pytest.fixture
def tls_server(tmp_path):
    """A LocalServer on 127.0.0.1 speaking TLS with a certificate for `images.example` only;
    yields (server, certificate PEM)."""
    import ssl

    cert, key = self_signed("images.example")
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server = LocalServer("127.0.0.1", tls=ctx)
    yield server, cert
    server.close()
