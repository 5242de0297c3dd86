"""Standard Webhooks signing, as OpenAI's SDK verifies it (`client.webhooks.unwrap`).

The signature is HMAC-SHA256 over `{webhook-id}.{webhook-timestamp}.{body}`, keyed with
the base64-decoded part of the `whsec_…` secret, and sent as `v1,<base64>`. It is made
over the exact bytes sent: the body is stored once, as bytes on the wire, and every
attempt sends those, with its own timestamp (the SDK refuses one over 5 minutes old).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32  # Standard Webhooks asks for 24 to 64 random bytes
USER_AGENT = "ftaas-webhooks/1.0"


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def signature(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(secret: str, webhook_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """Every header of one attempt's POST."""
    return {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(secret, webhook_id, timestamp, body),
    }
