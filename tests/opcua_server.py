"""A real OPC UA server (asyncua) playing the line PLC, on its own thread and event loop.

    with PlcServer() as plc:                      # 127.0.0.1, a free port, security None
        plc.endpoint                              # opc.tcp://127.0.0.1:PORT
        plc.read("Grade")                         # (value, VariantType)
        plc.set("PartPresent", True)              # as the PLC program would
        plc.writes                                # each client Write request: its NodeIds, in order
        plc.written                               # … and its values: {variable name: value}
        plc.stop(); plc.start()                   # the PLC gone, and back on the same port

The variables live in namespace 2 as ``ns=2;s=Line3.Cam1.<name>`` (:func:`node`);
VARIABLES lists them with their types. ``ReadOnlyGrade`` is not writable.
``secure=`` makes a Sign / SignAndEncrypt (Basic256Sha256) server that trusts one
client certificate and takes one username/password (see :func:`make_certificates`).
"""

from __future__ import annotations

import asyncio
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncua import Server, ua
from asyncua.common.callback import CallbackType
from asyncua.common.utils import ServiceError
from asyncua.crypto import cert_gen
from asyncua.crypto.permission_rules import User, UserRole
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

HOST = "127.0.0.1"
NAMESPACE = 2
VT = ua.VariantType
VARIABLES: dict[str, tuple[Any, ua.VariantType, bool]] = {  # name: (initial value, type, writable)
    "PartId": ("", VT.String, True),
    "Grade": (0, VT.Int16, True),
    "Grade32": (0, VT.Int32, True),
    "ReadOnlyGrade": (0, VT.Int16, False),
    "Sequence": (0, VT.UInt32, True),
    "Sequence64": (0, VT.Int64, True),
    "DefectAreaPct": (0.0, VT.Double, True),
    "Heartbeat": (0, VT.UInt32, True),
    "Alive": (False, VT.Boolean, True),
    "PartPresent": (False, VT.Boolean, True),
    "PresentPartId": ("", VT.String, True),
}
SERVER_URI = "urn:station:test:plc"
CLIENT_URI = "urn:station:test:client"


def node(name: str) -> str:
    """The NodeId text of a variable of VARIABLES."""
    return f"ns={NAMESPACE};s=Line3.Cam1.{name}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Certificates:
    server_cert: Path  # DER
    server_key: Path  # PEM
    client_cert: Path  # DER
    client_key: Path  # PEM
    other_cert: Path  # DER: a certificate that is neither's (a wrong pin)


def make_certificates(d: Path) -> Certificates:
    """Self-signed application instance certificates (RSA 2048, a day) for the server
    and the client, with the URIs of SERVER_URI and CLIENT_URI, and one more."""
    d.mkdir(parents=True, exist_ok=True)

    def pair(name: str, uri: str, usage: list) -> tuple[Path, Path]:
        key = cert_gen.generate_private_key()
        cert = cert_gen.generate_self_signed_app_certificate(
            key, name, {}, [x509.UniformResourceIdentifier(uri), x509.DNSName("localhost")], usage, days=1)
        cert_path, key_path = d / f"{name}.der", d / f"{name}.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_path.chmod(0o600)
        return cert_path, key_path

    server = pair("server", SERVER_URI, [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    client = pair("client", CLIENT_URI, [ExtendedKeyUsageOID.CLIENT_AUTH])
    other, _ = pair("other", "urn:station:test:other", [ExtendedKeyUsageOID.SERVER_AUTH])
    return Certificates(server[0], server[1], client[0], client[1], other)


class _Users:
    """Admits one username/password (as an ordinary user: access levels apply)."""

    def __init__(self, users: dict[str, str]):
        self.users = users

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> User | None:
        if username is not None and self.users.get(username) == password:
            return User(role=UserRole.User, name=username)
        return None


class PlcServer:
    """An asyncua server with VARIABLES on 127.0.0.1 (see the module's text)."""

    def __init__(self, port: int | None = None, secure: Certificates | None = None,
                 users: dict[str, str] | None = None):
        self.port = port or free_port()
        self.endpoint = f"opc.tcp://{HOST}:{self.port}"
        self.secure = secure
        self.users = users
        self.writes: list[list[str]] = []
        self.written: list[dict[str, Any]] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="plc-server", daemon=True)
        self._thread.start()
        self._server: Server | None = None
        self._run(self._init(), 30)

    def _run(self, coro: Any, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _init(self) -> None:
        server = Server(user_manager=_Users(self.users) if self.users is not None else None)
        await server.init()
        server.set_endpoint(self.endpoint)
        if self.secure is not None:
            server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
                                        ua.SecurityPolicyType.Basic256Sha256_Sign])
            await server.set_application_uri(SERVER_URI)
            await server.load_certificate(str(self.secure.server_cert))
            await server.load_private_key(str(self.secure.server_key))
            trusted = self.secure.client_cert.read_bytes()

            async def validate(cert: x509.Certificate, app: ua.ApplicationDescription) -> None:
                if cert.public_bytes(serialization.Encoding.DER) != trusted:
                    raise ServiceError(ua.StatusCodes.BadCertificateUntrusted)

            server.set_certificate_validator(validate)
        else:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        if self.users is not None:
            server.set_identity_tokens([ua.UserNameIdentityToken])
        ns = await server.register_namespace("urn:station:test")
        assert ns == NAMESPACE
        for name, (value, vtype, writable) in VARIABLES.items():
            var = await server.nodes.objects.add_variable(ua.NodeId(f"Line3.Cam1.{name}", NAMESPACE), name,
                                                          ua.Variant(value, vtype))
            if writable:
                await var.set_writable()

        def written(event: Any, dispatcher: Any) -> None:
            if event.is_external:
                nodes = event.request_params.NodesToWrite
                self.writes.append([w.NodeId.to_string() for w in nodes])
                self.written.append({str(w.NodeId.Identifier).rsplit(".", 1)[-1]: w.Value.Value.Value for w in nodes})

        server.subscribe_server_callback(CallbackType.PostWrite, written)
        self._server = server
        await server.start()

    def start(self) -> None:
        """Listen again (after stop), with the same variables and values."""
        assert self._server is not None
        self._run(self._server.start())

    def stop(self) -> None:
        """Close the listener and every connection."""
        assert self._server is not None
        self._run(self._server.stop())

    def read(self, name: str) -> tuple[Any, ua.VariantType]:
        """A variable's value and its Variant type, as the server holds them."""
        server = self._server
        assert server is not None

        async def read() -> ua.DataValue:  # on the server's loop, as its clients' reads are
            return server.read_attribute_value(ua.NodeId.from_string(node(name)))

        dv = self._run(read())
        return dv.Value.Value, dv.Value.VariantType

    def set(self, name: str, value: Any) -> None:
        """Write a variable as the PLC program would (its own type)."""
        assert self._server is not None
        vtype = VARIABLES[name][1]
        self._run(self._server.write_attribute_value(ua.NodeId.from_string(node(name)),
                                                     ua.DataValue(ua.Variant(value, vtype))))

    def close(self) -> None:
        try:
            if self._server is not None:
                self._run(self._server.stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    def __enter__(self) -> "PlcServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
