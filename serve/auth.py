"""API keys shared by every Serve app: the driver resolves keys from an environment variable
and hands the replicas only their SHA-256 digests, compared in constant time."""
from __future__ import annotations

import hashlib
import hmac
import os
from typing import Iterable, Mapping

from serve.openai_protocol import OpenAIError


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def keys_from_env(var: str | None) -> set[str]:
    """The accepted keys named by ``var`` (one key or several separated by commas); empty when
    ``var`` is None. A named but empty variable is an error, never an open server."""
    if not var:
        return set()
    keys = {k.strip() for k in os.environ.get(var, "").split(",") if k.strip()}
    if not keys:
        raise ValueError(f"api_key_env={var} but that environment variable is empty: set it to one key "
                         "or a comma-separated list")
    return keys


def authorize(headers: Mapping[str, str], key_hashes: Iterable[str]) -> None:
    """Raise a 401 unless ``Authorization: Bearer <key>`` matches one of ``key_hashes``."""
    key_hashes = list(key_hashes)
    if not key_hashes:
        return
    scheme, _, key = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise OpenAIError("missing API key: send 'Authorization: Bearer <key>'", status=401,
                          code="invalid_api_key", type="authentication_error")
    digest = hash_key(key.strip())
    if not any(hmac.compare_digest(digest, h) for h in key_hashes):
        raise OpenAIError("invalid API key", status=401, code="invalid_api_key", type="authentication_error")
