import pytest

from datagen.url_guard import refusal_reason


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1/x.jpg", "http://localhost:8000/a.png", "http://10.1.2.3/a", "http://192.168.0.1/a",
     "http://169.254.169.254/latest/meta-data", "http://[::1]/a", "http://0.0.0.0/a", "http://[::ffff:10.0.0.1]/a"],
)  # fmt: skip
def test_internal_hosts_refused(url):
    reason = refusal_reason(url)
    assert reason.startswith("refused: host") and "--allow-private" in reason
    assert refusal_reason(url, allow_private=True) is None


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/a.jpg", "gopher://x/"])
def test_non_http_schemes_refused(url):
    assert refusal_reason(url).startswith("refused: scheme")


def test_public_address_literal_allowed():
    assert refusal_reason("http://93.184.215.14/a.jpg") is None  # resolving an IP literal needs no DNS
