#!/usr/bin/env python3
"""Docker HEALTHCHECK of the gq-serve image: exit 0 when GET /health answers 200, else 1.

Standard library only (the image has no curl). Asks the port of GQ_PORT (default 8000) on the
address of GQ_HOST, or on the loopback address when the server listens on all interfaces.
Both engines answer /health without the API key.
"""
from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping

TIMEOUT_S = 5.0
_ANY_ADDRESS = ("", "0.0.0.0", "::", "[::]")


def health_url(env: Mapping[str, str]) -> str:
    host = env.get("GQ_HOST", "").strip()
    if host in _ANY_ADDRESS:
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    port = env.get("GQ_PORT", "").strip() or "8000"
    return f"http://{host}:{port}/health"


def main(env: Mapping[str, str] | None = None) -> int:
    url = health_url(os.environ if env is None else env)
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:
            status = resp.status
    except urllib.error.HTTPError as e:
        status = e.code
    except (OSError, ValueError) as e:
        print(f"unhealthy: {url}: {e}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: {url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
