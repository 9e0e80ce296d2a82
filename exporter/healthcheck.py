"""The container's health check: `python -m exporter.healthcheck` exits 0 when `/healthz` is 200.

Docker's HEALTHCHECK runs this inside the exporter's own container, so it asks the loopback
address on `EXPORTER_PORT` (9877 by default) for `/healthz`, which answers 503 while cycles
fail, so `docker ps` shows the container unhealthy when it cannot do its job. When the web
config file turns TLS on, the endpoint speaks only HTTPS: the check then connects with TLS
too. It does not verify the certificate (the name on it is the service's, not 127.0.0.1,
and the process it reaches is the one next to it), and the probe paths need no credentials.
It imports only the standard library, so a check costs milliseconds, not a start-up.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping

Opener = Callable[[str, "ssl.SSLContext | None", float], int]


def _open(url: str, context: ssl.SSLContext | None, timeout: float) -> int:
    with urllib.request.urlopen(url, timeout=timeout, context=context) as answer:  # noqa: S310 - loopback URL built here
        return int(answer.status)


def _unverified() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # see the module docstring: loopback, open probe path
    return context


def check(env: Mapping[str, str], opener: Opener = _open, timeout: float = 4.0) -> str | None:
    """None when `/healthz` answers 200 over plain HTTP or over TLS, else why not (one line)."""
    port = env.get("EXPORTER_PORT", "9877")
    problems = []
    for scheme, context in (("http", None), ("https", _unverified())):
        url = f"{scheme}://127.0.0.1:{port}/healthz"
        try:
            status = opener(url, context, timeout)
        except urllib.error.HTTPError as exc:
            problems.append(f"{url} answered {exc.code}")
            continue
        except (OSError, ValueError) as exc:
            problems.append(f"{url}: {exc}")
            continue
        if status == 200:
            return None
        problems.append(f"{url} answered {status}")
    return "; ".join(problems)


def main() -> int:
    """Exit 0 when the exporter is live, 1 with one line on stderr otherwise."""
    problem = check(os.environ)
    if problem is None:
        return 0
    sys.stderr.write(f"unhealthy: {problem}\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
