"""EmailChannel against a real SMTP server (aiosmtpd) on a loopback port: plain, STARTTLS,
implicit TLS with a self-signed certificate, AUTH, refusals, and a server that goes away."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import email.utils
import ipaddress
import ssl
from collections.abc import Iterator
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from forewarn.channel_email import EmailChannel, SmtpServer, message_id
from forewarn.channels import Bounced, Channel, Failed, Outcome, Outgoing, Retry, Sent

from .server import free_port, start_smtp

HOST = "127.0.0.1"
NOW_MS = 1_767_571_200_000  # 2026-01-05T00:00:00Z
SENDER = "Forewarn <help@example.com>"


# --- a real server ----------------------------------------------------------------------------


class Inbox:
    """An aiosmtpd handler that keeps what it accepts, or answers RCPT, MAIL or DATA as told."""

    def __init__(self, rcpt: str = "", mail: str = "", data: str = "") -> None:
        self.answers = {"rcpt": rcpt, "mail": mail, "data": data}
        self.received: list[EmailMessage] = []
        self.sessions: list[Any] = []
        self.envelopes: list[tuple[str, list[str]]] = []

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self.answers["mail"]:
            return self.answers["mail"]
        envelope.mail_from = address
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.answers["rcpt"]:
            return self.answers["rcpt"]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.answers["data"]:
            return self.answers["data"]
        content = envelope.content.replace(b"\r\n", b"\n")
        mail = BytesParser(policy=policy.default).parsebytes(content)
        assert isinstance(mail, EmailMessage)
        self.received.append(mail)
        self.sessions.append(session)
        self.envelopes.append((envelope.mail_from, envelope.rcpt_tos))
        return "250 2.0.0 queued as 42"


@contextlib.contextmanager
def smtp_server(handler: Inbox, port: int | None = None, **options: Any) -> Iterator[int]:
    controller = start_smtp(handler, port, **options)
    try:
        yield controller.port
    finally:
        controller.stop()


def outgoing(**fields: Any) -> Outgoing:
    values: dict[str, Any] = {
        "id": 1,
        "key": "storage-85:acme:1:email",
        "channel": "email",
        "workspace": 1,
        "trigger": "storage-85",
        "subject": "u1",
        "scope": "user",
        "to": "ada@example.org",
        "title": "You are close to your storage limit",
        "text": "Hi Ada,\nyou have used 87% of your storage.",
        "html": "<p>Hi Ada,</p><p>you have used <b>87%</b> of your storage.</p>",
    }
    values.update(fields)
    return Outgoing(**values)


def channel(url: str, **options: Any) -> EmailChannel:
    options.setdefault("timeout_s", 5.0)
    return EmailChannel(SmtpServer.from_url(url), SENDER, now_ms=lambda: NOW_MS, **options)


def send_all(ch: EmailChannel, *messages: Outgoing) -> list[Outcome]:
    async def run() -> list[Outcome]:
        try:
            return [await ch.send(m) for m in messages]
        finally:
            await ch.aclose()

    return asyncio.run(run())


# --- a self-signed certificate ----------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def server_tls(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    return context


def client_tls(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certificate[0]))


# --- the message ------------------------------------------------------------------------------


def test_the_channel_is_a_channel():
    ch: Channel = EmailChannel.from_url("smtps://u:p@mail.example.com", SENDER, timeout_s=3)
    assert ch.name == "email" and ch.deduplicates is False
    assert isinstance(ch, EmailChannel)
    assert ch.server == SmtpServer("mail.example.com", 465, True, "u", "p")
    assert ch.timeout_s == 3


def test_a_message_arrives_with_every_header_and_both_bodies():
    inbox = Inbox()
    message = outgoing(data={"unsubscribe_url": "https://fw.example.com/u/abc"})
    with smtp_server(inbox) as port:
        (outcome,) = send_all(channel(f"smtp://{HOST}:{port}"), message)
    assert isinstance(outcome, Sent)
    assert "queued as 42" in outcome.detail
    (mail,) = inbox.received
    assert mail["From"] == SENDER
    assert mail["To"] == "ada@example.org"
    assert mail["Subject"] == "You are close to your storage limit"
    assert mail["Date"].datetime == datetime.datetime.fromtimestamp(NOW_MS / 1000, datetime.UTC)
    assert mail["Message-ID"] == message_id(message.key, "example.com")
    assert mail["Message-ID"] in outcome.detail
    assert mail["List-Unsubscribe"] == "<https://fw.example.com/u/abc>"
    assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert mail["Reply-To"] is None
    assert mail.get_content_type() == "multipart/alternative"
    plain, html = mail.get_body(("plain",)), mail.get_body(("html",))
    assert plain is not None and html is not None
    assert plain.get_content().rstrip("\n") == message.text
    assert html.get_content().rstrip("\n") == message.html


def test_one_click_headers_only_with_an_unsubscribe_url_and_text_only_without_html():
    inbox = Inbox()
    with smtp_server(inbox) as port:
        outcomes = send_all(channel(f"smtp://{HOST}:{port}"), outgoing(html=""))
    assert all(isinstance(o, Sent) for o in outcomes)
    (mail,) = inbox.received
    assert "List-Unsubscribe" not in mail and "List-Unsubscribe-Post" not in mail
    assert mail.get_content_type() == "text/plain"
    assert mail.get_content().rstrip("\n") == outgoing().text


def test_the_trigger_settings_override_from_and_reply_to_and_text_may_be_unicode():
    inbox = Inbox()
    settings = {"from": "Billing <billing@example.net>", "reply_to": "ops@example.net"}
    message = outgoing(settings=settings, title="Grüße – bald voll", text="Grüße, Ada 👋")
    with smtp_server(inbox) as port:
        (outcome,) = send_all(channel(f"smtp://{HOST}:{port}"), message)
    assert isinstance(outcome, Sent)
    (mail,) = inbox.received
    assert mail["From"] == "Billing <billing@example.net>"
    assert mail["Reply-To"] == "ops@example.net"
    assert mail["Subject"] == "Grüße – bald voll"
    plain = mail.get_body(("plain",))
    assert plain is not None and plain.get_content().rstrip("\n") == "Grüße, Ada 👋"
    # the id stays on the server's domain, whatever the From of one trigger says
    assert mail["Message-ID"].endswith("@example.com>")


def test_the_message_id_is_the_same_for_every_try_of_one_key():
    inbox = Inbox()
    with smtp_server(inbox) as port:
        outcomes = send_all(
            channel(f"smtp://{HOST}:{port}"),
            outgoing(attempt=1),
            outgoing(attempt=2),
            outgoing(key="storage-85:acme:2:email"),
        )
    assert all(isinstance(o, Sent) for o in outcomes)
    first, again, other = (m["Message-ID"] for m in inbox.received)
    assert first == again != other
    assert email.utils.parseaddr(first)[1].startswith("forewarn.")


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"to": ""}, "no email address"),
        ({"to": "not an address"}, "To 'not an address' is not one email address"),
        ({"to": "ada@"}, "is not one email address"),
        ({"to": "ada@example.org, eve@example.org"}, "is not one email address"),
        ({"to": "ada@example.org\nBcc: eve@example.org"}, "is not one email address"),
        ({"settings": {"from": "nobody"}}, "From 'nobody' is not one email address"),
        ({"settings": {"reply_to": "@x"}}, "Reply-To '@x' is not one email address"),
        ({"title": "two\nlines"}, "linefeed"),
    ],
)
def test_messages_that_cannot_be_sent_as_they_are_fail_without_a_connection(fields, problem):
    ch = channel(f"smtp://{HOST}:{free_port()}")  # nothing listens: it must not get that far
    (outcome,) = send_all(ch, outgoing(**fields))
    assert isinstance(outcome, Failed)
    assert problem in outcome.detail


def test_a_name_and_address_is_written_as_given_and_the_envelope_has_the_address():
    inbox = Inbox()
    with smtp_server(inbox) as port:
        (outcome,) = send_all(
            channel(f"smtp://{HOST}:{port}"), outgoing(to="Ada L. <ada@example.org>")
        )
    assert isinstance(outcome, Sent)
    assert inbox.received[0]["To"] == '"Ada L." <ada@example.org>'
    assert inbox.envelopes == [("help@example.com", ["ada@example.org"])]


# --- what the server answers ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answers", "kind", "code"),
    [
        ({"rcpt": "550 5.1.1 no such user"}, Bounced, "550 5.1.1 no such user"),
        ({"rcpt": "451 4.7.1 greylisted, try later"}, Retry, "451 4.7.1 greylisted"),
        ({"data": "554 5.7.1 rejected as spam"}, Bounced, "554 5.7.1 rejected as spam"),
        ({"data": "452 4.3.1 insufficient storage"}, Retry, "452 4.3.1"),
        ({"mail": "553 5.7.1 sender not allowed"}, Failed, "553 5.7.1 sender not allowed"),
        ({"mail": "421 4.3.2 shutting down"}, Retry, "421 4.3.2"),
    ],
)
def test_refusals_become_outcomes(answers, kind, code):
    with smtp_server(Inbox(**answers)) as port:
        (outcome,) = send_all(channel(f"smtp://{HOST}:{port}"), outgoing())
    assert type(outcome) is kind
    assert code in outcome.detail


def test_a_refusal_leaves_the_connection_usable_for_the_next_message():
    inbox = Inbox(rcpt="550 5.1.1 no such user")
    with smtp_server(inbox) as port:
        ch = channel(f"smtp://{HOST}:{port}")

        async def run() -> list[Outcome]:
            bounced = await ch.send(outgoing())
            connection = ch._smtp
            inbox.answers["rcpt"] = ""
            sent = await ch.send(outgoing())
            assert ch._smtp is connection  # the same connection carried both
            await ch.aclose()
            return [bounced, sent]

        bounced, sent = asyncio.run(run())
    assert isinstance(bounced, Bounced) and isinstance(sent, Sent)
    assert len(inbox.received) == 1


def test_a_server_that_goes_away_means_retry_and_the_next_send_reconnects():
    inbox = Inbox()
    port = free_port()
    ch = channel(f"smtp://{HOST}:{port}")

    async def run() -> list[Outcome]:
        outcomes = [await ch.send(outgoing(key="k1"))]  # nobody listens yet
        with smtp_server(inbox, port):
            outcomes.append(await ch.send(outgoing(key="k2")))
        outcomes.append(await ch.send(outgoing(key="k3")))  # stopped
        with smtp_server(inbox, port):
            outcomes.append(await ch.send(outgoing(key="k4")))  # back
            await ch.aclose()
        return outcomes

    refused, sent, stopped, back = asyncio.run(run())
    assert isinstance(refused, Retry) and f"{HOST}:{port}" in refused.detail
    assert isinstance(sent, Sent)
    assert isinstance(stopped, Retry)
    assert isinstance(back, Sent)
    assert [m["Message-ID"] for m in inbox.received] == [
        message_id("k2", "example.com"),
        message_id("k4", "example.com"),
    ]


# --- TLS and AUTH -----------------------------------------------------------------------------


def test_smtps_with_a_self_signed_certificate(certificate):
    inbox = Inbox()
    with smtp_server(inbox, ssl_context=server_tls(certificate)) as port:
        url = f"smtps://{HOST}:{port}"
        (outcome,) = send_all(channel(url, tls_context=client_tls(certificate)), outgoing())
        (untrusted,) = send_all(channel(url), outgoing())
    assert isinstance(outcome, Sent)
    assert len(inbox.received) == 1
    assert isinstance(untrusted, Retry) and "CERTIFICATE_VERIFY_FAILED" in untrusted.detail


def test_starttls_when_the_server_offers_it(certificate):
    inbox = Inbox()
    with smtp_server(inbox, tls_context=server_tls(certificate)) as port:
        ch = channel(f"smtp://{HOST}:{port}", tls_context=client_tls(certificate))
        (outcome,) = send_all(ch, outgoing())
    assert isinstance(outcome, Sent)
    (session,) = inbox.sessions
    assert session.ssl is not None  # the message went over TLS


def test_plain_when_the_server_offers_no_starttls():
    inbox = Inbox()
    with smtp_server(inbox) as port:
        (outcome,) = send_all(channel(f"smtp://{HOST}:{port}"), outgoing())
    assert isinstance(outcome, Sent)
    assert inbox.sessions[0].ssl is None


PASSWORD = "p@ss:w/rd secret"


def authenticator(server, session, envelope, mechanism, auth_data):
    ok = isinstance(auth_data, LoginPassword) and auth_data == (b"mailer", PASSWORD.encode())
    # handled=False: aiosmtpd answers 535 itself
    return AuthResult(success=ok, handled=False, auth_data=auth_data)


def test_auth_with_the_user_and_password_of_the_url():
    inbox = Inbox()
    options: dict[str, Any] = {"authenticator": authenticator, "auth_require_tls": False}
    with smtp_server(inbox, **options) as port:
        url = f"smtp://mailer:p%40ss%3Aw%2Frd%20secret@{HOST}:{port}"
        (outcome,) = send_all(channel(url), outgoing())
    assert isinstance(outcome, Sent)
    assert inbox.sessions[0].authenticated
    assert inbox.sessions[0].login_data == b"mailer"


def test_a_wrong_password_is_retried_and_never_shown():
    options: dict[str, Any] = {"authenticator": authenticator, "auth_require_tls": False}
    with smtp_server(Inbox(), **options) as port:
        ch = channel(f"smtp://mailer:not-it-p%40ss@{HOST}:{port}")
        (outcome,) = send_all(ch, outgoing())
    assert isinstance(outcome, Retry)
    assert "535" in outcome.detail
    assert "not-it" not in outcome.detail and "not-it" not in repr(ch.server)


# --- the URL ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("smtp://mail.example.com", SmtpServer("mail.example.com", 587, False)),
        ("smtp://mail.example.com:25", SmtpServer("mail.example.com", 25, False)),
        ("smtps://u:p@mail.example.com", SmtpServer("mail.example.com", 465, True, "u", "p")),
        ("smtp://a%40b.c:p%2F1@[::1]:2525/", SmtpServer("::1", 2525, False, "a@b.c", "p/1")),
    ],
)
def test_smtp_urls(url, expected):
    assert SmtpServer.from_url(url) == expected


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("//mail.example.com:25", "scheme must be smtp or smtps, not none"),
        ("http://mail.example.com", "not http"),
        ("smtp://", "names no host"),
        ("smtp://mail.example.com:99999", "port must be a number"),
        ("smtp://mail.example.com:abc", "port must be a number"),
        ("smtp://mail.example.com/inbox", "path, query or fragment"),
        ("smtp://user@mail.example.com", "both a user name and a password"),
        ("smtp://user:hunter2@mail.example.com:x", "port must be a number"),
        ("smtp://user:hun/ter2@mail.example.com", "as %2F"),
    ],
)
def test_bad_smtp_urls_say_what_is_wrong(url, problem):
    with pytest.raises(ValueError, match="bad SMTP URL") as caught:
        SmtpServer.from_url(url)
    message = str(caught.value)
    assert problem in message
    assert "e.g. smtp://user:password@smtp.example.com:587" in message
    assert "hunter2" not in message and "ter2" not in message


def test_the_sender_must_be_an_address():
    with pytest.raises(ValueError, match="not one email address"):
        EmailChannel(SmtpServer("localhost", 25, False), "Forewarn")
