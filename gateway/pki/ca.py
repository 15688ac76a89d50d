"""The sgw certificate authority: an ECDSA P-256 root, leaf certificates and the CRL.

P-256 rather than Ed25519 because mosquitto 2.0 / OpenSSL 1.1 clients and MCU TLS stacks (mbedTLS,
wolfSSL on small devices) all handle it; Ed25519 X.509 support is still patchy along that path.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.core import keys
from gateway.errors import ProvisioningError

CA_DAYS = 3650
LEAF_DAYS = 825
CRL_DAYS = 365
# Back-date notBefore a little so a device whose clock runs slightly behind accepts a fresh certificate.
BACKDATE = dt.timedelta(minutes=5)
ORG = "sgw"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def ec_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def new_mlkem768() -> tuple[bytes, bytes]:
    """A fresh gateway ML-KEM-768 key (suite x25519-mlkem768) as (64-byte private seed, 1184-byte public)."""
    key = keys.generate_kem()
    return keys.kem_private_to_bytes(key), keys.kem_public_bytes(key)


def new_x25519() -> tuple[bytes, bytes]:
    """A fresh end-to-end identity as (raw 32-byte private, raw 32-byte public)."""
    key = x25519.X25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return private, public


def serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def not_after_ns(cert: x509.Certificate) -> int:
    return int(cert.not_valid_after_utc.timestamp()) * 1_000_000_000


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def serial(self) -> str:
        return serial_hex(self.cert)


class CertificateAuthority:
    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self.key = key

    @classmethod
    def create(cls, *, common_name: str = "sgw root CA", days: int = CA_DAYS) -> CertificateAuthority:
        key = new_ec_key()
        name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ])
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> CertificateAuthority:
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except FileNotFoundError as exc:
            raise ProvisioningError(
                f"no CA at {cert_path.parent} (missing {Path(exc.filename).name}); run 'sgw ca init' first"
            ) from None
        except (ValueError, TypeError) as exc:
            raise ProvisioningError(f"CA files in {cert_path.parent} are unreadable: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ProvisioningError(f"CA key {key_path} is not an EC key")
        return cls(cert, key)

    def issue(
        self,
        common_name: str,
        *,
        client: bool = True,
        server: bool = False,
        sans: Sequence[str] = (),
        days: int = LEAF_DAYS,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> Issued:
        """Issue a leaf certificate for `common_name` with a fresh (or given) P-256 key."""
        key = key or new_ec_key()
        return Issued(self.leaf(common_name, key.public_key(), client=client, server=server, sans=sans,
                                days=days), key)

    def leaf(
        self,
        common_name: str,
        public_key: ec.EllipticCurvePublicKey,
        *,
        client: bool = True,
        server: bool = False,
        sans: Sequence[str] = (),
        days: int = LEAF_DAYS,
    ) -> x509.Certificate:
        """A leaf certificate for a key held elsewhere (a device's CSR: its private key never left it)."""
        now = _now()
        usages = []
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(min(now + dt.timedelta(days=days), self.cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(_general_names(sans)), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def crl(self, revoked: Iterable[tuple[str, int]], *, days: int = CRL_DAYS) -> bytes:
        """A PEM CRL listing (serial_hex, revoked_at_ns) pairs.

        nextUpdate matters: OpenSSL (and so mosquitto) rejects every client once the CRL has expired, so
        it is long by default and any revocation command re-issues it.
        """
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - BACKDATE)
            .next_update(now + dt.timedelta(days=days))
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
        )
        for serial, at_ns in revoked:
            when = dt.datetime.fromtimestamp(at_ns / 1e9, dt.UTC) if at_ns else now
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(int(serial, 16)).revocation_date(when).build()
            )
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def check_sans(sans: Sequence[str]) -> None:
    """Raise ProvisioningError for a name that cannot go into a certificate, before anything is written."""
    if not sans:
        raise ProvisioningError("the broker certificate needs at least one subject alternative name")
    _general_names(sans)


def _general_names(sans: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for san in sans:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(san)))
        except ValueError:
            if not san or len(san) > 253 or not all(c.isalnum() or c in ".-_*" for c in san):
                raise ProvisioningError(f"invalid subject alternative name {san!r}") from None
            names.append(x509.DNSName(san))
    return names
