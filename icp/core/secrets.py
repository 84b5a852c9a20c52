"""Keep secrets out of everything a run writes: run directories, resolved configs, logs, sbatch scripts.

A secret is the value of an environment variable whose name looks like one (``*_TOKEN``, ``*_KEY``,
``*SECRET*``, ``*PASSWORD*``, ``WANDB_API_KEY``). Libraries that need a key (wandb, the HF hub) read
it from the environment themselves; icp never copies it into a file. ``redact`` is the last line of
defence for text icp writes itself (configs shown to W&B, sbatch scripts, reports): any planted
value is replaced by ``<redacted:NAME>``.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

SECRET_NAME = re.compile(r"(TOKEN|_KEY|^KEY)$|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
# Values this short are too likely to occur by chance (e.g. "1", "true") to be worth redacting.
MIN_SECRET_LENGTH = 6


def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME.search(name))


def secret_values(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """{value: env name} of every secret-looking environment variable (long enough to matter)."""
    environ = os.environ if environ is None else environ
    return {v: k for k, v in environ.items() if is_secret_name(k) and len(v.strip()) >= MIN_SECRET_LENGTH}


def redact(text: str, environ: Mapping[str, str] | None = None) -> str:
    """``text`` with every secret value replaced by ``<redacted:NAME>`` (longest values first)."""
    for value, name in sorted(secret_values(environ).items(), key=lambda kv: -len(kv[0])):
        text = text.replace(value, f"<redacted:{name}>")
    return text


def redact_tree(data: Any, environ: Mapping[str, str] | None = None) -> Any:
    """A copy of a JSON-like structure with secrets redacted in every string (keys included)."""
    secrets = secret_values(environ)
    if not secrets:
        return data

    def walk(node: Any) -> Any:
        if isinstance(node, str):
            return redact(node, environ)
        if isinstance(node, Mapping):
            return {walk(k) if isinstance(k, str) else k: walk(v) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(walk(v) for v in node)
        return node

    return walk(data)


def leaks(text: str, environ: Mapping[str, str] | None = None) -> list[str]:
    """Names of the environment secrets whose values occur in ``text`` (for checks and tests)."""
    return sorted({name for value, name in secret_values(environ).items() if value in text})
