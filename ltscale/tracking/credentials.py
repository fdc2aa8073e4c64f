"""Credentials in tracking URIs, kept out of messages, logs and run records.

A tracking URI may carry a user and password (``http://alice:secret@host:5000``; MLflow's client
sends them as HTTP Basic auth), and MLflow's errors quote the URI whole. Whatever ltscale prints,
logs or stores in a run (its tags, its params) passes through :func:`redact_uri` first. No MLflow
import here: the CLI's error handler uses this on machines without it.
"""

from __future__ import annotations

import re

# The password of a URL's user info: up to the last "@" before the path, as urllib and requests split it.
_URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^/\s]*@")


def redact_uri(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***`` (``http://alice:***@host``)."""
    return _URL_PASSWORD.sub(r"\1***@", text)
