"""Settings from the environment: every `FOREWARN_*` variable Forewarn reads is named here,
with its default, so that one list is documented (docs/deployment.md, kept so by a test)."""

from __future__ import annotations

import os

PREFIX = "FOREWARN_"

# name (without the prefix) -> default ("" for none)
SETTINGS: dict[str, str] = {
    "DB": "forewarn.db",
    "PLAYBOOKS": "playbooks",
    "HOST": "127.0.0.1",
    "PORT": "8750",
    "WORKSPACE": "default",
    "RATE_LIMIT": "50000",
    "ENGINE": "process",
    "LOG_LEVEL": "warning",
    "WRITE_KEY": "",
    "ADMIN_KEY": "",
    "STRIPE_SECRET": "",
    "REQUIRE_SERVICES": "",
}


def env(name: str) -> str | None:
    """The setting's value from the environment, else its default (None when it has none)."""
    if name not in SETTINGS:
        raise KeyError(f"no setting {PREFIX}{name}: add it to forewarn.settings.SETTINGS")
    value = os.environ.get(PREFIX + name)
    if value is None or value == "":
        return SETTINGS[name] or None
    return value
