"""schemathesis hooks: give the fuzzer the credentials that are not one header.

PostHog clients put the write key in the body (`api_key`) and Stripe signs the body
(`Stripe-Signature`); neither can be generated, so they are filled in here from the environment
the test sets (`FUZZ_WRITE_KEY`, `FUZZ_STRIPE_SECRET`). A value the fuzzer made invalid on
purpose (a negative case: the wrong type) is left as it is.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from typing import Any

import schemathesis

POSTHOG_PATHS = ("/batch/", "/capture/", "/i/v1/analytics/events")


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    path = case.operation.path
    if path in POSTHOG_PATHS and isinstance(case.body, dict):
        if isinstance(case.body.get("api_key", ""), str):
            case.body["api_key"] = os.environ["FUZZ_WRITE_KEY"]
    elif (
        path == "/webhooks/stripe"
        and isinstance(case.body, dict)
        and "Stripe-Signature" in (case.headers or {})
    ):
        body = json.dumps(case.body).encode()
        stamp = str(int(time.time()))
        secret = os.environ["FUZZ_STRIPE_SECRET"].encode()
        digest = hmac.new(secret, stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        case.headers["Stripe-Signature"] = f"t={stamp},v1={digest}"
        kwargs["data"] = body


# A Sentry envelope is text: send the generated string as it is.
schemathesis.serializer.alias("application/x-sentry-envelope", "text/plain")
