"""Email over SMTP: the `Channel` that sends an `Outgoing` as one email. Edge.

One connection stays open across sends and is opened again when it dropped. What the server
answers becomes an outcome: accepted is `Sent`; a 5xx to the recipient or to the message is
`Bounced` (the worker suppresses the address); any 4xx, a refused or dropped connection and a
timeout are `Retry`; a message that cannot be sent as it is (no address, a header that cannot be
written, a sender the server refuses for good) is `Failed`. The password never appears in an
outcome or a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy
from email.errors import HeaderParseError, NonASCIILocalPartDefect, ObsoleteHeaderDefect
from email.headerregistry import AddressHeader
from email.message import EmailMessage
from urllib.parse import unquote, urlsplit

import aiosmtplib

from forewarn import clock
from forewarn.channels import Bounced, Failed, Outcome, Outgoing, Retry, Sent

EXAMPLE_URL = "smtp://user:password@smtp.example.com:587"
DEFAULT_PORTS = {"smtp": 587, "smtps": 465}
_HARMLESS = (NonASCIILocalPartDefect, ObsoleteHeaderDefect)


@dataclass(frozen=True)
class SmtpServer:
    """Where to send, read from an SMTP URL."""

    host: str
    port: int
    implicit_tls: bool  # smtps: TLS from the first byte; smtp: STARTTLS when offered
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def from_url(cls, url: str) -> SmtpServer:
        """`smtp://user:pass@host:port` or `smtps://…`; user and password percent-encoded."""

        def bad(problem: str) -> ValueError:
            return ValueError(f"bad SMTP URL {_masked(url)!r}: {problem}; e.g. {EXAMPLE_URL}")

        parts = urlsplit(url.strip())
        if parts.scheme not in DEFAULT_PORTS:
            raise bad(f"the scheme must be smtp or smtps, not {parts.scheme or 'none'}")
        if "@" in parts.path + parts.query + parts.fragment:
            raise bad("write '/', '?', '#' or '@' in a user name or password as %2F, %3F, %23, %40")
        if not parts.hostname:
            raise bad("it names no host")
        try:
            port = parts.port or DEFAULT_PORTS[parts.scheme]
        except ValueError:
            raise bad("the port must be a number from 1 to 65535") from None
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise bad("it has a path, query or fragment; only user, password, host and port")
        if (parts.username is None) != (parts.password is None):
            raise bad("give both a user name and a password, or neither")
        return cls(
            host=parts.hostname,
            port=port,
            implicit_tls=parts.scheme == "smtps",
            username=unquote(parts.username) if parts.username is not None else None,
            password=unquote(parts.password) if parts.password is not None else None,
        )


def _masked(url: str) -> str:
    """The URL without user and password, for error messages (a password may hold any
    character, so everything up to the last @ goes)."""
    if "@" not in url:
        return url
    head, _, host = url.rpartition("@")
    scheme = head.split("://", 1)[0] + "://" if "://" in head else ""
    return f"{scheme}***@{host}"


def mailbox(text: str) -> str | None:
    """The address in `text` ("ada@example.org" or "Ada <ada@example.org>") if it holds exactly
    one, else None."""
    try:
        header = policy.default.header_factory("To", text)
    except (ValueError, IndexError, HeaderParseError):  # the stdlib parser trips on "a@"
        return None
    # a non-ASCII local part (SMTPUTF8) and obsolete syntax ("Ada L. <…>") are fine
    if any(not isinstance(d, _HARMLESS) for d in header.defects):
        return None
    if not isinstance(header, AddressHeader) or len(header.addresses) != 1:
        return None
    address = header.addresses[0]
    return address.addr_spec if address.username and address.domain else None


def message_id(key: str, domain: str) -> str:
    """The same Message-ID for every try of one message, so a resend after a crash can be
    recognised (and threaded) by the receiver."""
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]
    return f"<forewarn.{digest}@{domain}>"


class EmailChannel:
    name = "email"
    deduplicates = False  # a second copy arrives as a second email, with the same Message-ID

    def __init__(
        self,
        server: SmtpServer,
        sender: str,
        *,
        timeout_s: float = 30.0,
        tls_context: ssl.SSLContext | None = None,
        now_ms: Callable[[], int] = clock.now_ms,
    ) -> None:
        address = mailbox(sender)
        if address is None:
            raise ValueError(f"the From address {sender!r} is not one email address")
        self.server = server
        self.sender = sender
        self.timeout_s = timeout_s
        self.tls_context = tls_context
        self._now_ms = now_ms
        self._domain = address.rpartition("@")[2]
        self._smtp: aiosmtplib.SMTP | None = None
        self._lock = asyncio.Lock()  # one connection, one mail transaction at a time

    @classmethod
    def from_url(
        cls,
        url: str,
        sender: str,
        *,
        timeout_s: float = 30.0,
        tls_context: ssl.SSLContext | None = None,
    ) -> EmailChannel:
        return cls(SmtpServer.from_url(url), sender, timeout_s=timeout_s, tls_context=tls_context)

    def compose(self, message: Outgoing) -> EmailMessage:
        """The email for `message`; a ValueError if it cannot be written (an address that is
        not one, a line break in the title)."""
        mail = EmailMessage()
        for header, value in [
            ("From", message.settings.get("from") or self.sender),
            ("To", message.to),
            ("Reply-To", message.settings.get("reply_to")),
        ]:
            if value is not None and mailbox(value) is None:
                raise ValueError(f"{header} {value!r} is not one email address")
            if value is not None:
                mail[header] = value
        mail["Subject"] = message.title
        mail["Date"] = email.utils.format_datetime(
            datetime.fromtimestamp(self._now_ms() / 1000, UTC)
        )
        mail["Message-ID"] = message_id(message.key, self._domain)
        if url := message.data.get("unsubscribe_url"):
            # RFC 8058: a mailbox provider's "unsubscribe" button POSTs to the URL
            mail["List-Unsubscribe"] = f"<{url}>"
            mail["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        mail.set_content(message.text)
        if message.html:
            mail.add_alternative(message.html, subtype="html")
        return mail

    async def send(self, message: Outgoing) -> Outcome:
        if not message.to:
            return Failed("no email address to send to")
        try:
            mail = self.compose(message)
        except (ValueError, TypeError) as exc:
            return Failed(f"cannot write the email: {exc}")
        async with self._lock:
            try:
                smtp = await self._connected()
            except (aiosmtplib.SMTPException, OSError) as exc:
                # the server or our settings, not this message: try again later
                return Retry(self._scrub(f"cannot connect to {self._where()}: {_describe(exc)}"))
            try:
                _, answer = await smtp.send_message(
                    mail, recipients=mail["To"].addresses[0].addr_spec
                )
            except (aiosmtplib.SMTPException, OSError, ValueError) as exc:
                return self._outcome(exc)
            except asyncio.CancelledError:
                self._drop()  # cut off mid-transaction: the connection is in no known state
                raise
        return Sent(f"{mail['Message-ID']}: {answer}")

    def _outcome(self, exc: Exception) -> Outcome:
        if isinstance(exc, aiosmtplib.SMTPRecipientsRefused) and exc.recipients:
            refused = exc.recipients[0]
            return self._by_code(refused.code, refused.message, Bounced, "recipient refused")
        if isinstance(exc, aiosmtplib.SMTPDataError):
            return self._by_code(exc.code, exc.message, Bounced, "message refused")
        if isinstance(exc, aiosmtplib.SMTPSenderRefused):
            return self._by_code(exc.code, exc.message, Failed, f"sender {exc.sender} refused")
        if isinstance(exc, aiosmtplib.SMTPResponseException):
            return self._by_code(exc.code, exc.message, Failed, "refused")
        if isinstance(exc, aiosmtplib.SMTPNotSupported | ValueError):
            return Failed(self._scrub(f"cannot send: {_describe(exc)}"))
        # the connection dropped or timed out: start afresh next time
        self._drop()
        return Retry(self._scrub(f"{self._where()}: {_describe(exc)}"))

    def _by_code(
        self, code: int, text: str, permanent: type[Bounced | Failed], what: str
    ) -> Outcome:
        detail = self._scrub(f"{what}: {code} {text}")
        return permanent(detail) if 500 <= code < 600 else Retry(detail)

    async def _connected(self) -> aiosmtplib.SMTP:
        if self._smtp is not None and self._smtp.is_connected:
            return self._smtp
        self._drop()
        smtp = aiosmtplib.SMTP(
            hostname=self.server.host,
            port=self.server.port,
            username=self.server.username,
            password=self.server.password,
            use_tls=self.server.implicit_tls,
            start_tls=False if self.server.implicit_tls else None,  # None: when offered
            tls_context=self.tls_context,
            timeout=self.timeout_s,
        )
        await smtp.connect()
        self._smtp = smtp
        return smtp

    def _drop(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            _cut(smtp, smtp.transport)

    def _where(self) -> str:
        return f"{self.server.host}:{self.server.port}"

    def _scrub(self, detail: str) -> str:
        password = self.server.password
        return detail.replace(password, "***") if password else detail

    async def aclose(self) -> None:
        async with self._lock:
            smtp, self._smtp = self._smtp, None
            if smtp is None or not smtp.is_connected:
                return
            transport = smtp.transport  # quit() forgets it
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await smtp.quit()
            _cut(smtp, transport)


def _cut(smtp: aiosmtplib.SMTP, transport: asyncio.BaseTransport | None) -> None:
    """Close the connection at once. A polite TLS close waits for the server's answer in the
    background and can outlive the event loop, leaving the socket open; after QUIT (or a
    failure) there is nothing left to say."""
    smtp.close()
    if isinstance(transport, asyncio.Transport):
        transport.abort()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return f"{exc.code} {exc.message}"
    return str(exc) or type(exc).__name__
