"""The internal listener's self-made TLS certificate.

The homeserver reaches the notary over TLS (Synapse only speaks HTTPS to key servers). The
listener is on loopback and the homeserver is told to skip certificate checks for its host
name (``federation_certificate_verification_whitelist``), so a self-signed certificate that
the gateway makes for itself on first start is enough, and no operator has to issue one.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# Long enough that nobody has to think about it; the certificate is not checked anyway.
_VALIDITY = datetime.timedelta(days=3650)


def certificate_paths(directory: Path) -> tuple[Path, Path]:
    """Where (certificate, private key) are kept in ``directory``; nothing is created."""
    return directory / "internal-tls.crt", directory / "internal-tls.key"


def ensure_self_signed_certificate(directory: Path, hostname: str) -> tuple[Path, Path]:
    """Returns (certificate, private key) paths in ``directory``, creating them if missing."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = certificate_paths(directory)
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = [x509.DNSName(hostname)]
    try:
        alt_names.append(x509.IPAddress(ipaddress.ip_address(hostname)))
    except ValueError:
        alt_names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Write the key with owner-only permissions before anything else can read it.
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_bytes)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path
