"""Certificates made by the tests with the real `openssl`: a throwaway CA, a server
certificate for 127.0.0.1 signed by it, and a client certificate signed by it (EC P-256
keys: fast to make). Also a bcrypt-hashed basic-auth user."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import bcrypt


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed none of the above


def _openssl(*args: str, cwd: Path) -> None:
    openssl = shutil.which("openssl")
    assert openssl, "openssl not on PATH"
    subprocess.run([openssl, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(directory: Path, name: str) -> None:
    _openssl(
        *("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
        *("-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}"),
        cwd=directory,
    )


def _signed(directory: Path, name: str, subject: str, extensions: str) -> None:
    _openssl(
        *("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
        *("-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject),
        cwd=directory,
    )
    (directory / f"{name}.ext").write_text(extensions + "\n")
    _openssl(
        *("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key"),
        *("-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext"),
        cwd=directory,
    )


def make_certs(directory: Path) -> Certs:
    """A CA, a server certificate for IP 127.0.0.1 and a client certificate, in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    _ca(directory, "ca")
    _ca(directory, "other-ca")
    _signed(directory, "server", "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1")
    _signed(directory, "client", "/CN=prometheus", "extendedKeyUsage=clientAuth")
    return Certs(
        ca=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
        other_ca=directory / "other-ca.crt",
    )


def bcrypt_hash(password: str, rounds: int = 4) -> str:
    """A bcrypt hash as `htpasswd -B` writes it (4 rounds: the cheapest, for tests)."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds)).decode()
