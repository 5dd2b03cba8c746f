"""Throw-away PKI for TLS tests: a CA, a server certificate for 127.0.0.1 and a
client certificate (EC P-256, two days), made with the openssl command line.

    d = make_pki(tmp_path / "pki")     # d / "ca.crt", "server.crt/.key", "client.crt/.key"

A second, unrelated CA (``other-ca.crt``) is there to test that a broker
certificate signed by someone else is refused.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def have_openssl() -> bool:
    return shutil.which("openssl") is not None


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", *EC, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=station test CA", cwd=d)
    _openssl("req", "-x509", *EC, "-keyout", "other-ca.key", "-out", "other-ca.crt", "-days", "2", "-subj", "/CN=someone else", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, ext in [("server", ["-extfile", "san.ext"]), ("client", [])]:
        _openssl("req", *EC, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "2", *ext, cwd=d)
    for key in d.glob("*.key"):
        key.chmod(0o600)
    return d


def tls_listener(pki: Path, require_certificate: bool = False) -> str:
    """Mosquitto listener lines for a TLS listener using ``pki``'s server certificate."""
    extra = f"cafile {pki / 'ca.crt'}\ncertfile {pki / 'server.crt'}\nkeyfile {pki / 'server.key'}\n"
    return extra + ("require_certificate true\n" if require_certificate else "")
