"""Secrets kept out of what a sweep logs: params, tags and the spec it stores as an artifact (a spec or a model
path may carry a token)."""

from __future__ import annotations

import os
import re
from typing import Any

# A name (an environment variable, a config key) that says its value is a secret: HF_TOKEN,
# AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_PASSWORD, api_key, ... (whole words: UCE's `tokens` is not one).
SECRET_KEY = re.compile(
    r"(^|[_.-])(token|secret|password|passwd|api[_-]?key|access[_-]?key|credentials?)($|[_.-])", re.I
)


def secret_values() -> list[str]:
    """Values of environment variables whose names say they are secrets (tokens, keys, passwords)."""
    return [v for k, v in os.environ.items() if SECRET_KEY.search(k) and len(v) >= 6]


def hidden(key: str, value: str, secrets: list[str]) -> bool:
    """Whether a value is a secret: its key (the last part of a dotted one) names a secret, or it holds the
    value of an environment secret."""
    return bool(SECRET_KEY.search(key.rsplit(".", 1)[-1])) or any(secret in value for secret in secrets)


def redact(params: dict[str, str]) -> dict[str, str]:
    """Params with secrets taken out: each secret is logged as "[redacted]"."""
    secrets = secret_values()
    return {key: "[redacted]" if hidden(key, value, secrets) else value for key, value in params.items()}


def redacted_spec(data: dict[str, Any]) -> dict[str, Any]:
    """The spec with any value that names or holds a secret replaced (it is logged as an artifact)."""
    secrets = secret_values()

    def clean(node: Any, key: str = "") -> Any:
        if isinstance(node, dict):
            return {k: clean(v, str(k)) for k, v in node.items()}
        if isinstance(node, list):
            return [clean(v, key) for v in node]
        return "[redacted]" if isinstance(node, str) and hidden(key, node, secrets) else node

    return clean(data)
