"""Credentials kept out of everything the job writes and prints: config, metrics, trackers, errors.

Torch-free and free of project imports, so that the errors module, the config and the trackers
all redact the same way without importing one another.
"""

from __future__ import annotations

import os
import re
from typing import Any

SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL")


def secret_values() -> list[str]:
    """Values of environment variables that look like credentials (HF_TOKEN, WANDB_API_KEY, ...)."""
    return [
        value
        for name, value in os.environ.items()
        if any(marker in name.upper() for marker in SECRET_MARKERS) and len(value) >= 6
    ]


# scheme://user:password@host -> scheme://***@host
_URL_USERINFO = re.compile(r"(\b[a-zA-Z][\w+.-]*://)[^/\s@]+@")
# ?token=... &api_key=... &X-Amz-Signature=... -> =***
_SECRET_QUERY = re.compile(r"([?&;][^=&\s#]*(?:token|key|secret|password|passwd|sig|signature|credential|auth)[^=&\s#]*=)[^&\s#'\"]+",
                           re.IGNORECASE)


def redact(obj: Any, secrets: list[str] | None = None) -> Any:
    """Returns ``obj`` with credentials replaced by ***: values of credential-like environment
    variables, the user-info of URLs, and URL query parameters named like a token or key."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(obj, str):
        for secret in secrets:
            obj = obj.replace(secret, "***")
        obj = _URL_USERINFO.sub(r"\1***@", obj)
        return _SECRET_QUERY.sub(r"\1***", obj)
    if isinstance(obj, dict):
        return {redact(k, secrets): redact(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v, secrets) for v in obj]
    return obj
