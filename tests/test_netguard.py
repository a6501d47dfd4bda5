"""The SSRF guard: which targets are refused, and that the guarded client connects to the very
address it checked."""

from __future__ import annotations

import asyncio
import socket

import pytest

from forewarn import netguard
from forewarn.errors import ForewarnError
from forewarn.netguard import RefusedTarget, address_refusal, check_url, guarded_client
from tests.receiver import receiver

PUBLIC_V4 = "93.184.215.14"
PUBLIC_V6 = "2606:2800:21f:cb07:6820:80da:af6b:8b2c"


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("100.64.0.1", "not globally routable"),
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1%eth0", "link-local"),
        ("fc00::1", "private"),
        ("ff02::1", "multicast"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("2002:a00:1::", "private"),  # 6to4 around 10.0.0.1
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 around 169.254.169.254
    ],
)
def test_non_public_addresses_are_refused(address, kind):
    reason = address_refusal(address)
    assert reason is not None and kind in reason


@pytest.mark.parametrize(
    "address", [PUBLIC_V4, PUBLIC_V6, "::ffff:93.184.215.14", "64:ff9b::808:808"]
)
def test_public_addresses_pass(address):
    assert address_refusal(address) is None


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://10.0.0.5:8080/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "https://localhost/",
    ],
)
def test_check_url_refuses_private_targets_unless_allowed(url):
    with pytest.raises(RefusedTarget) as refused:
        check_url(url, allow_private=False)
    assert isinstance(refused.value, ForewarnError)
    assert "refused to connect" in refused.value.message
    assert "FOREWARN_WEBHOOK_ALLOW_PRIVATE=1" in refused.value.message
    assert check_url(url, allow_private=True)


def test_check_url_passes_a_public_address():
    assert check_url(f"https://{PUBLIC_V4}/hook", allow_private=False) == [PUBLIC_V4]


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/",
        "file:///etc/passwd",
        "gopher://example.com/",
        "javascript:alert(1)",
        "http:///path",
    ],
)
def test_only_http_and_https_urls_with_a_host(url):
    with pytest.raises(RefusedTarget, match="only http:// and https://"):
        check_url(url, allow_private=True)


def test_every_address_of_a_host_is_checked(monkeypatch):
    def getaddrinfo(host, port, *args, **kwargs):
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", (PUBLIC_V4, port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", port)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    with pytest.raises(RefusedTarget, match=r"10\.0\.0\.1 is private"):
        check_url("https://mixed.example/", allow_private=False)


def test_an_unresolvable_host_is_refused(monkeypatch):
    def getaddrinfo(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    with pytest.raises(RefusedTarget, match=r"cannot resolve nowhere\.example"):
        check_url("https://nowhere.example/", allow_private=False)


def test_the_client_connects_to_the_address_it_checked(monkeypatch):
    """`rebind.test` is in no DNS: reaching the receiver shows the socket went to the address
    the guard resolved and checked, with one lookup per connection and the Host kept."""
    lookups: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        lookups.append(host)
        return ["127.0.0.1"]

    monkeypatch.setattr(netguard, "resolve", resolve)

    async def post(url: str, allow_private: bool) -> int:
        async with guarded_client(allow_private, timeout_s=5) as client:
            return (await client.post(url, content=b"{}")).status_code

    with receiver() as r:
        port = r.url.rsplit(":", 1)[1]
        assert asyncio.run(post(f"http://rebind.test:{port}/x", allow_private=True)) == 200
        assert lookups == ["rebind.test"]
        assert r.seen[0].headers["host"] == f"rebind.test:{port}"
        with pytest.raises(RefusedTarget, match=r"127\.0\.0\.1 is loopback"):
            asyncio.run(post(f"http://rebind.test:{port}/x", allow_private=False))
        assert len(r.seen) == 1


def test_the_client_ignores_proxy_variables(monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://10.9.9.9:1")
    monkeypatch.setenv("ALL_PROXY", "http://10.9.9.9:1")

    async def post(url: str) -> int:
        async with guarded_client(allow_private=True, timeout_s=5) as client:
            return (await client.post(url)).status_code

    with receiver() as r:
        assert asyncio.run(post(r.url)) == 200
