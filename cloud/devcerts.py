"""Development certificates for trying TLS and mutual TLS: a CA, a server cert and client certs."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
    path.with_suffix(".key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.with_suffix(".key").chmod(0o600)
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    sans: list[str] | None = None,
    usage: ExtendedKeyUsageOID | None = None,
    days: int = 365,
) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        entries: list[x509.GeneralName] = []
        for s in sans:
            try:
                entries.append(x509.IPAddress(ipaddress.ip_address(s)))
            except ValueError:
                entries.append(x509.DNSName(s))
        builder = builder.add_extension(x509.SubjectAlternativeName(entries), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def write_dev_certs(
    out_dir: str | Path, hosts: list[str] | None = None, clients: list[str] | None = None
) -> dict[str, Path]:
    """Write ``ca``, ``server`` and one cert per client (``<name>.crt/.key``); returns the paths by role."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca = _issue("tandem-dev-ca", ca_key, None, ca_key, ca=True, days=3650)
    _write(out / "ca", ca_key, ca)
    paths = {"ca": out / "ca.crt"}
    server_key = _key()
    server = _issue(
        "tandem-gateway",
        server_key,
        ca,
        ca_key,
        sans=hosts or ["localhost", "127.0.0.1"],
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
    )
    _write(out / "server", server_key, server)
    paths["server"] = out / "server.crt"
    for name in clients or ["device"]:
        key = _key()
        _write(out / name, key, _issue(name, key, ca, ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH))
        paths[name] = out / f"{name}.crt"
    return paths
