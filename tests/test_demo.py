"""`forewarn demo` comes up, serves its pages, fires, sends email into its maildir, and stops
cleanly on Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from forewarn.demo import ADMIN_KEY

from .server import free_port


def wait_for(check: Callable[[], Any], timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.25)
    return check()


def test_the_demo_comes_up_fires_sends_email_and_stops(tmp_path: Path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    demo = subprocess.Popen(
        [sys.executable, "-m", "forewarn", "demo", "--dir", str(tmp_path), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert demo.stdout is not None
        printed = [demo.stdout.readline() for _ in range(3)]
        assert f"{url}/demo/" in "".join(printed), printed
        page = httpx.get(url + "/demo/", timeout=10)
        assert page.status_code == 200 and "<script" in page.text

        def firings() -> list[dict[str, object]]:
            r = httpx.get(
                url + "/api/v1/firings",
                headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                timeout=10,
            )
            return list(r.json()["firings"])

        fired = wait_for(firings, 60)
        assert fired, "no trigger fired within a minute"
        mail = wait_for(lambda: sorted((tmp_path / "demo-mail").glob("*.eml")), 60)
        assert mail, "no email reached the demo's SMTP sink within a minute"
        text = mail[0].read_text()
        assert "To: " in text and "@example.test" in text
    finally:
        demo.send_signal(signal.SIGINT)  # as Ctrl-C would
        out, _ = demo.communicate(timeout=60)
    assert demo.returncode == 0, out
    assert "demo stopped:" in out
    try:
        httpx.get(url + "/healthz", timeout=2)
        up = True
    except httpx.HTTPError:
        up = False
    assert not up, "the server is still running after the demo stopped"


def test_the_demos_published_keys_stay_on_this_machine(tmp_path: Path, monkeypatch):
    from forewarn import demo
    from forewarn.errors import InputError

    monkeypatch.delenv("FOREWARN_WRITE_KEY", raising=False)
    monkeypatch.delenv("FOREWARN_ADMIN_KEY", raising=False)
    with pytest.raises(InputError, match="published keys"):
        demo.run(demo.Options(folder=tmp_path, host="0.0.0.0"))
    assert not (tmp_path / "demo-mail").exists()  # refused before anything started
