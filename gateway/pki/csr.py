"""Certificate requests for a rotation started on the device (`sgw device cmd ID rotate-key`).

The device makes its new TLS key and asks for a certificate; only the request travels, so the private
key never leaves the device. Both checks live here, one home for what a valid request and a valid answer
are: the CA side accepts a request only for the device's own id and with a valid self-signature, and the
device installs an answer only if the CA it trusts issued it, for its id, over the key it asked with.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.errors import ProvisioningError

MAX_DER_BYTES = 2048  # a P-256 request or leaf is under 600 bytes; bound what a peer makes us parse


def make_csr(device_id: str, key: ec.EllipticCurvePrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.DER)


def _common_name(name: x509.Name) -> str:
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if len(values) == 1 else ""


def requested_key(der: bytes, device_id: str) -> ec.EllipticCurvePublicKey:
    """The P-256 key a device's request asks a certificate for; ProvisioningError if it is not one."""
    if len(der) > MAX_DER_BYTES:
        raise ProvisioningError("certificate request too large")
    try:
        csr = x509.load_der_x509_csr(der)
    except ValueError:
        raise ProvisioningError("certificate request unreadable") from None
    if not csr.is_signature_valid:
        raise ProvisioningError("certificate request signature invalid")
    if _common_name(csr.subject) != device_id:
        raise ProvisioningError(f"certificate request is not for {device_id}")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ProvisioningError("certificate request must be for a P-256 key")
    return key


def check_issued(der: bytes, *, ca: x509.Certificate, device_id: str,
                 key: ec.EllipticCurvePrivateKey) -> None:
    """Refuses (ProvisioningError) a certificate that our CA did not issue for this device and key."""
    if len(der) > MAX_DER_BYTES:
        raise ProvisioningError("certificate too large")
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        raise ProvisioningError("certificate unreadable") from None
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise ProvisioningError("certificate not issued by the trusted CA") from None
    if _common_name(cert.subject) != device_id:
        raise ProvisioningError(f"certificate is not for {device_id}")
    if cert.public_key() != key.public_key():
        raise ProvisioningError("certificate is for another key than the one requested")
