"""Keeping credentials out of logs, errors and results.

Every secret the worker learns (env keys, a job's s3Config) is registered here; a logging
filter masks them in every record, and error messages pass through ``redact`` before they
leave the worker.
"""

from __future__ import annotations

import logging
import os
import threading

MASK = "[REDACTED]"
SECRET_ENV_VARS = ("BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY", "RUNPOD_API_KEY", "HF_TOKEN",
                   "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")

_secrets: set[str] = set()
_lock = threading.Lock()


def register(*values: object) -> None:
    # Very short values would mask ordinary words; real keys are long.
    with _lock:
        _secrets.update(str(value) for value in values if isinstance(value, str) and len(value) >= 6)


def register_env(env: dict[str, str] | os._Environ = os.environ) -> None:
    register(*(env.get(name) for name in SECRET_ENV_VARS))


def redact(text: str) -> str:
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)  # longest first: one may contain another
    for secret in secrets:
        text = text.replace(secret, MASK)
    return text


class RedactingFilter(logging.Filter):
    """Formats the record's message, masks secrets in it (and in its traceback), and keeps it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install(level: int = logging.INFO) -> None:
    """Route logging through the redacting filter on every handler of the root logger."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in root.handlers:
        if not any(isinstance(existing, RedactingFilter) for existing in handler.filters):
            handler.addFilter(RedactingFilter())
