"""The SSRF guard for outgoing HTTP: webhook URLs come from playbooks and push endpoints from
browsers, so neither may point Forewarn at its own network. Edge.

A target is refused unless its scheme is http or https and every address its host resolves to
is globally routable (not loopback, private, link-local, multicast, reserved, unspecified or shared,
also when wrapped in an IPv4-mapped or 6to4 IPv6 address). `allow_private` lifts the address
rule, for development (`FOREWARN_WEBHOOK_ALLOW_PRIVATE=1`).

DNS rebinding: the check runs inside the HTTP client's network backend, at the moment a
connection is opened. The host is resolved once, every address is checked, and the socket is
opened to a checked address literal, so a second lookup that could answer differently never
happens. TLS still verifies the certificate against the host name. `guarded_client` builds such a
client; it follows no redirects and ignores proxy variables (a proxy would be what we connect to).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import typing
from collections.abc import Iterable

import anyio
import httpcore
import httpx

from forewarn.errors import ForewarnError

SCHEMES = ("http", "https")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # IPv4 reached through a NAT64 gateway


class RefusedTarget(ForewarnError):
    code = "refused_target"


def address_refusal(address: str) -> str | None:
    """Why this address may not be reached, or None if it is globally routable."""
    ip: IPAddress = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone
    if isinstance(ip, ipaddress.IPv6Address):
        wrapped = ip.ipv4_mapped or ip.sixtofour
        if wrapped is None and ip in NAT64:
            wrapped = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if wrapped is not None:  # judged by the IPv4 address it carries
            inner = address_refusal(str(wrapped))
            return inner and f"{inner} (inside {address})"
    for kind, hit in (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
        ("not globally routable", not ip.is_global),
    ):
        if hit:
            return f"{address} is {kind}"
    return None


def check_addresses(host: str, addresses: Iterable[str], allow_private: bool) -> list[str]:
    """The addresses, if every one may be reached; else RefusedTarget."""
    found = list(dict.fromkeys(addresses))
    if not found:
        raise RefusedTarget(f"{host} resolves to no address")
    if not allow_private:
        for address in found:
            reason = address_refusal(address)
            if reason:
                raise RefusedTarget(
                    f"refused to connect to {host}: {reason}; only public addresses are "
                    "allowed (set FOREWARN_WEBHOOK_ALLOW_PRIVATE=1 to allow private ones, "
                    "for development)"
                )
    return found


def check_scheme(url: str) -> httpx.URL:
    """The parsed URL if its scheme is http(s) and it names a host; else RefusedTarget."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as e:
        raise RefusedTarget(f"not a valid URL: {url!r} ({e})") from None
    if parsed.scheme not in SCHEMES or not parsed.host:
        raise RefusedTarget(f"refused {url!r}: only http:// and https:// URLs with a host")
    return parsed


def _addresses(infos: list[tuple[typing.Any, ...]]) -> list[str]:
    return [str(info[4][0]) for info in infos]


def check_url(url: str, allow_private: bool) -> list[str]:
    """Check a URL now (resolving its host, blocking): the addresses it reaches; else
    RefusedTarget. For validating configuration; sending goes through `guarded_client`."""
    parsed = check_scheme(url)
    try:
        infos = socket.getaddrinfo(parsed.host, parsed.port or 443, type=socket.SOCK_STREAM)
    except OSError as e:
        raise RefusedTarget(f"cannot resolve {parsed.host}: {e}") from None
    return check_addresses(parsed.host, _addresses(infos), allow_private)


async def resolve(host: str, port: int) -> list[str]:
    """Every address of host (one lookup)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return _addresses(infos)


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, checking and pinning the addresses it connects to."""

    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private
        self.inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            with anyio.fail_after(timeout):
                addresses = await resolve(host, port)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from None
        except OSError as e:
            raise httpcore.ConnectError(f"cannot resolve {host}: {e}") from None
        error: Exception | None = None
        for address in check_addresses(host, addresses, self.allow_private):
            try:
                return await self.inner.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as e:
                error = e
        assert error is not None  # check_addresses returns at least one
        raise error

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise RefusedTarget("refused to connect to a unix socket")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    def __init__(self, allow_private: bool) -> None:
        super().__init__()
        # httpx takes no network backend, so the pool it built is swapped for one with ours;
        # tests/test_netguard.py fails if a later httpx stops sending requests through it.
        # (SSL_CERT_FILE / SSL_CERT_DIR still apply; proxies are the client's trust_env.)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            network_backend=GuardedBackend(allow_private),
        )


def guarded_client(allow_private: bool, timeout_s: float) -> httpx.AsyncClient:
    """An HTTP client that refuses private targets (unless allowed) and follows no redirects."""
    return httpx.AsyncClient(
        transport=GuardedTransport(allow_private),
        timeout=timeout_s,
        follow_redirects=False,
        trust_env=False,
    )
