"""The coordinator's TLS material: a private CA, the SuperLink's certificate, and their checks.

Nodes and the `flwr` CLI reach the SuperLink over TLS (HTTPS for the Fleet
and Control APIs, gRPC with the same certificate and key) and verify it
against a root certificate that the consortium distributes: `ca.crt`. A
consortium without an internal PKI creates that CA here; one with its own
PKI brings a CA-issued certificate, which `check_server_certificate` checks
before the coordinator starts, so that a wrong file fails here with one
precise message instead of as a TLS handshake error on every node.

Keys are EC P-384 (ECDSA with SHA-384): the curve Flower uses for node keys,
accepted by every TLS stack the SuperLink and its clients use (OpenSSL via
Python's `ssl`/uvicorn/httpx, BoringSSL via gRPC), 192-bit security, and
small, fast handshakes; RSA 3072 buys nothing here but size and speed costs.

The CA is a root with `path_length=0`: it issues server certificates only,
never another CA. Clients check the SubjectAlternativeName, not the CN, so
every name and address nodes dial must be in the SAN.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from consortia.common.atomic import write_bytes_atomic
from consortia.common.errors import ConsortiaError

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644

DEFAULT_CA_NAME = "consortia CA"
DEFAULT_CA_DAYS = 3650
DEFAULT_SERVER_DAYS = 365
BACKDATE = dt.timedelta(minutes=5)  # tolerate clocks a few minutes behind ours
EXPIRY_NOTICE_DAYS = 30  # `coordinator status` and `node doctor` warn this long before

_CURVE = ec.SECP384R1()
_HASH = hashes.SHA384()
_DNS_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")

AnyPrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class CertificateError(ConsortiaError):
    """A CA, certificate or TLS key cannot be created, read or trusted as asked."""


@dataclass(frozen=True)
class CertificateInfo:
    """What an operator compares and checks: who, for which names, until when, which bytes."""

    path: Path
    subject: str
    issuer: str
    fingerprint: str  # SHA-256 of the DER bytes, colon hex like `openssl x509 -fingerprint`
    not_before: dt.datetime
    not_after: dt.datetime
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA written by `create_ca`."""

    certificate: Path
    private_key: Path
    info: CertificateInfo


@dataclass(frozen=True)
class ServerCertificate:
    """A SuperLink certificate: what to pass to `--ssl-certfile/--ssl-keyfile/--ssl-ca-certfile`."""

    certificate: Path
    private_key: Path
    ca_certificate: Path
    info: CertificateInfo
    ca_info: CertificateInfo
    warnings: tuple[str, ...] = ()


# --------------------------------------------------------------------------- creation


def create_ca(
    out_dir: Path,
    common_name: str = DEFAULT_CA_NAME,
    days: int = DEFAULT_CA_DAYS,
    *,
    force: bool = False,
) -> CertificateAuthority:
    """Create a self-signed CA in `out_dir`: `ca.crt` (0644) and `ca.key` (0600).

    Refuses to overwrite either file unless `force`: a new CA invalidates
    every certificate the old one issued and every node's trust in it.
    """
    _check_days(days)
    if not common_name.strip():
        raise CertificateError("the CA's name is empty; pass --name with a name for the CA")
    cert_path, key_path = out_dir / CA_CERT, out_dir / CA_KEY
    _refuse_overwrite(
        [cert_path, key_path],
        force,
        "a new CA would make every node's ca.crt and every certificate it issued useless",
    )
    key = ec.generate_private_key(_CURVE)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name.strip())])
    now = _now()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, _HASH)
    )
    _make_private_dir(out_dir)
    write_bytes_atomic(key_path, _private_pem(key), mode=PRIVATE_MODE)
    write_bytes_atomic(cert_path, _cert_pem(certificate), mode=PUBLIC_MODE)
    return CertificateAuthority(cert_path, key_path, certificate_info(certificate, cert_path))


def issue_server_certificate(
    ca_dir: Path,
    out_dir: Path,
    hosts: Sequence[str],
    ips: Sequence[str],
    days: int = DEFAULT_SERVER_DAYS,
    *,
    force: bool = False,
) -> ServerCertificate:
    """Issue the SuperLink's key and certificate with the CA in `ca_dir`.

    Writes `server.crt` (0644), `server.key` (0600) and a copy of the CA's
    `ca.crt` (0644) into `out_dir`. Every host name and IP address nodes
    dial goes into the SubjectAlternativeName; the first one is also the CN.
    """
    _check_days(days)
    dns_names = [_valid_host(host) for host in hosts]
    addresses = [_valid_ip(ip) for ip in ips]
    if not dns_names and not addresses:
        raise CertificateError(
            "no host name or IP address for the certificate; pass every name nodes use to "
            "reach the SuperLink with --host (and addresses with --ip)"
        )
    ca_cert, ca_key = load_ca(ca_dir)
    now = _now()
    not_after = now + dt.timedelta(days=days)
    if not_after > ca_cert.not_valid_after_utc:
        left = (ca_cert.not_valid_after_utc - now).days
        raise CertificateError(
            f"{ca_dir / CA_CERT}: the CA expires on {_date(ca_cert.not_valid_after_utc)}, "
            f"before the {days} days asked for; pass --days {max(left, 1)} or less, "
            "or create a new CA (`consortia provision ca`) and give nodes its ca.crt"
        )
    cert_path, key_path = out_dir / SERVER_CERT, out_dir / SERVER_KEY
    ca_copy = out_dir / CA_CERT
    ca_bytes = (ca_dir / CA_CERT).read_bytes()
    copy_ca = not _same_file(ca_copy, ca_dir / CA_CERT)
    existing = [cert_path, key_path]
    if copy_ca and ca_copy.exists() and ca_copy.read_bytes() != ca_bytes:
        existing.append(ca_copy)
    _refuse_overwrite(existing, force, "the SuperLink may be using them")

    key = ec.generate_private_key(_CURVE)
    common_name = dns_names[0] if dns_names else str(addresses[0])
    san: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    san += [x509.IPAddress(address) for address in addresses]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # ECDHE with an ECDSA key only signs; keyEncipherment is for RSA key transport.
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_authority_key_id(ca_cert, ca_key), critical=False)
        .sign(ca_key, _HASH)
    )
    _make_private_dir(out_dir)
    write_bytes_atomic(key_path, _private_pem(key), mode=PRIVATE_MODE)
    write_bytes_atomic(cert_path, _cert_pem(certificate), mode=PUBLIC_MODE)
    if copy_ca:
        write_bytes_atomic(ca_copy, ca_bytes, mode=PUBLIC_MODE)
    return ServerCertificate(
        certificate=cert_path,
        private_key=key_path,
        ca_certificate=ca_copy,
        info=certificate_info(certificate, cert_path),
        ca_info=certificate_info(ca_cert, ca_dir / CA_CERT),
    )


def load_ca(ca_dir: Path) -> tuple[x509.Certificate, AnyPrivateKey]:
    """Read `ca.crt` and `ca.key` from `ca_dir`; check they form a usable CA."""
    cert_path, key_path = ca_dir / CA_CERT, ca_dir / CA_KEY
    hint = f"create a CA with `consortia provision ca --out {ca_dir}`"
    for path in (cert_path, key_path):
        if not path.is_file():
            raise CertificateError(f"{path}: not found; {hint}, or pass the CA's folder with --ca")
    certificate = load_certificates(cert_path, "CA certificate")[0]
    key = load_private_key(key_path, "CA key")
    if _spki(key.public_key()) != _spki(certificate.public_key()):
        raise CertificateError(
            f"{key_path}: this key does not belong to {cert_path}; "
            "put the CA's own key beside its certificate"
        )
    if not _is_ca(certificate):
        raise CertificateError(
            f"{cert_path}: not a CA certificate (its BasicConstraints do not say CA:TRUE); {hint}"
        )
    if certificate.not_valid_after_utc <= _now():
        raise CertificateError(
            f"{cert_path}: the CA expired on {_date(certificate.not_valid_after_utc)}; create "
            f"a new one (`consortia provision ca --out {ca_dir} --force`), issue the server "
            "certificate again with it and give every node its new ca.crt"
        )
    return certificate, key


# --------------------------------------------------------------------------- checking


def check_server_certificate(
    cert: Path,
    key: Path,
    ca: Path,
    *,
    hosts: Sequence[str] = (),
    now: dt.datetime | None = None,
) -> ServerCertificate:
    """Check a SuperLink certificate (ours or a site's own CA-issued one) before it is served.

    `cert` may hold the server certificate followed by intermediate CA
    certificates; `ca` holds the root(s) nodes will trust. `hosts` are names
    or addresses nodes dial, each of which the certificate must cover. Every
    failure is one `CertificateError` naming the file, the problem and the fix.
    """
    when = now if now is not None else _now()
    chain = load_certificates(cert, "server certificate")
    leaf, intermediates = chain[0], chain[1:]
    roots = load_certificates(ca, "CA certificate")
    private_key = load_private_key(key, "server key")
    reissue = "issue a new one (`consortia provision coordinator`, or from your organisation's CA)"

    if _spki(private_key.public_key()) != _spki(leaf.public_key()):
        raise CertificateError(
            f"{key}: this key does not belong to {cert} (their public keys differ); "
            "use the key the certificate was issued for"
        )
    if _is_ca(leaf):
        raise CertificateError(
            f"{cert}: is a CA certificate, not a server certificate; pass the SuperLink's "
            "own certificate (and the CA's with --ca)"
        )
    _check_issued_by(cert, leaf, intermediates, ca, roots)
    if leaf.not_valid_after_utc <= when:
        raise CertificateError(
            f"{cert}: the certificate expired on {_date(leaf.not_valid_after_utc)}; {reissue}"
        )
    if leaf.not_valid_before_utc > when:
        raise CertificateError(
            f"{cert}: the certificate is not valid before {_date(leaf.not_valid_before_utc)}; "
            "check this machine's clock, or wait until then"
        )
    dns_names, addresses = _san(leaf)
    if not dns_names and not addresses:
        raise CertificateError(
            f"{cert}: the certificate has no SubjectAlternativeName; clients check the SAN, "
            f"not the CN, so no client would accept it: {reissue} with every host name and IP "
            "address nodes use"
        )
    if ExtendedKeyUsageOID.SERVER_AUTH not in _extended_key_usage(leaf):
        raise CertificateError(
            f"{cert}: the certificate is not for TLS servers (its ExtendedKeyUsage lacks "
            f"serverAuth); {reissue} with ExtendedKeyUsage serverAuth"
        )
    for host in hosts:
        if not _covers(host, dns_names, addresses):
            covered = ", ".join([*dns_names, *map(str, addresses)])
            raise CertificateError(
                f"{cert}: the certificate does not cover {host!r} (it covers {covered}); "
                f"{reissue} that includes {host!r}, or let nodes dial a covered name"
            )
    _verify_chain(cert, leaf, intermediates, ca, roots, dns_names, addresses, when)

    warnings: list[str] = []
    for ca_cert in roots:
        if ca_cert.not_valid_after_utc < leaf.not_valid_after_utc:
            warnings.append(
                f"{ca}: the CA expires on {_date(ca_cert.not_valid_after_utc)}, before the "
                f"server certificate ({_date(leaf.not_valid_after_utc)}): clients stop "
                "trusting it then"
            )
    loose = _loose_mode(key)
    if loose is not None:
        warnings.append(
            f"{key}: private key readable by other users (mode {loose:04o}); chmod 600 {key}"
        )
    return ServerCertificate(
        certificate=cert,
        private_key=key,
        ca_certificate=ca,
        info=certificate_info(leaf, cert),
        ca_info=certificate_info(_issuing_root(leaf, intermediates, roots), ca),
        warnings=tuple(warnings),
    )


def _check_issued_by(
    cert_path: Path,
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    ca_path: Path,
    roots: Sequence[x509.Certificate],
) -> None:
    """Walk leaf → intermediates → a root of `ca`, checking each signature: precise messages."""
    current = leaf
    for _ in range(len(intermediates) + 1):
        root = next((c for c in roots if c.subject == current.issuer), None)
        issuer = root or next((c for c in intermediates if c.subject == current.issuer), None)
        if issuer is None:
            held = "; ".join(c.subject.rfc4514_string() for c in roots)
            raise CertificateError(
                f"{cert_path}: not issued by the CA in {ca_path} (issued by "
                f"'{current.issuer.rfc4514_string()}', the CA file holds '{held}'); pass the CA "
                "that issued it, and append any intermediate CA certificates to "
                f"{cert_path.name} after the server certificate"
            )
        try:
            current.verify_directly_issued_by(issuer)
        except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise CertificateError(
                f"{cert_path}: its signature does not verify with the public key of "
                f"'{issuer.subject.rfc4514_string()}' in {ca_path if root else cert_path} "
                f"({exc or 'bad signature'}); it was issued by another CA with the same name: "
                "pass the CA that really issued it"
            ) from None
        if root is not None:
            return
        current = issuer
    raise CertificateError(f"{cert_path}: its intermediate certificates form a loop")


def _verify_chain(
    cert_path: Path,
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    ca_path: Path,
    roots: Sequence[x509.Certificate],
    dns_names: Sequence[str],
    addresses: Sequence[IPAddress],
    when: dt.datetime,
) -> None:
    """The whole RFC 5280 / CA-B Forum path validation, as TLS clients do it."""
    from cryptography.x509 import verification

    subject: verification.Subject = (
        x509.DNSName(dns_names[0]) if dns_names else x509.IPAddress(addresses[0])
    )
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store(list(roots)))
        .time(when)
        .build_server_verifier(subject)
    )
    try:
        verifier.verify(leaf, list(intermediates))
    except verification.VerificationError as exc:
        raise CertificateError(
            f"{cert_path}: does not validate against the CA in {ca_path} as TLS clients "
            f"check it: {exc}"
        ) from None


# --------------------------------------------------------------------------- reading


def load_certificates(path: Path, what: str) -> list[x509.Certificate]:
    """All certificates of a PEM file, first one first; precise errors for wrong files."""
    data = _read(path, what)
    labels = _pem_labels(data)
    if "CERTIFICATE" not in labels:
        raise CertificateError(f"{path}: {_not_pem_reason(data, labels, 'certificate')}")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CertificateError(
            f"{path}: the {what} is corrupt (a BEGIN CERTIFICATE block does not decode); "
            "copy the file again from its source"
        ) from None


def load_private_key(path: Path, what: str) -> AnyPrivateKey:
    """An unencrypted PEM private key (EC or RSA), as the SuperLink reads it."""
    data = _read(path, what)
    labels = _pem_labels(data)
    if "OPENSSH PRIVATE KEY" in labels:
        raise CertificateError(
            f"{path}: an OpenSSH key; the SuperLink needs a PEM key (BEGIN PRIVATE KEY): "
            f"convert it with `openssl pkey -in {path.name} -out {path.name}`"
        )
    if not any(label.endswith("PRIVATE KEY") for label in labels):
        raise CertificateError(f"{path}: {_not_pem_reason(data, labels, 'private key')}")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # encrypted, and no password given
        raise CertificateError(
            f"{path}: the {what} is encrypted with a passphrase, which the SuperLink cannot "
            f"enter; decrypt it (`openssl pkey -in {path.name} -out {path.name}.plain`) and "
            "protect the file with chmod 600 instead"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise CertificateError(
            f"{path}: the {what} is corrupt or of an unsupported type; "
            "copy the file again from its source"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CertificateError(
            f"{path}: a {type(key).__name__} key; TLS certificates here use EC or RSA keys"
        )
    return key


def certificate_info(certificate: x509.Certificate, path: Path) -> CertificateInfo:
    """The facts an operator checks about a certificate."""
    dns_names, addresses = _san(certificate)
    return CertificateInfo(
        path=path,
        subject=certificate.subject.rfc4514_string(),
        issuer=certificate.issuer.rfc4514_string(),
        fingerprint=certificate_fingerprint(certificate),
        not_before=certificate.not_valid_before_utc,
        not_after=certificate.not_valid_after_utc,
        dns_names=tuple(dns_names),
        ip_addresses=tuple(str(address) for address in addresses),
    )


def expiry_notice(
    certificate: x509.Certificate,
    what: str,
    *,
    within_days: int = EXPIRY_NOTICE_DAYS,
    now: dt.datetime | None = None,
) -> str | None:
    """A notice when `certificate` has expired, or expires within `within_days`; else None.

    "<what> expired on <date>", or "<what> expires on <date>, in N days".
    """
    when = now if now is not None else _now()
    ends = certificate.not_valid_after_utc
    if ends <= when:
        return f"{what} expired on {_date(ends)}"
    if ends - when <= dt.timedelta(days=within_days):
        return f"{what} expires on {_date(ends)}, in {(ends - when).days} days"
    return None


def certificate_fingerprint(certificate: x509.Certificate) -> str:
    """SHA-256 of the DER bytes in `openssl x509 -noout -fingerprint -sha256` form."""
    return "SHA256:" + certificate.fingerprint(hashes.SHA256()).hex(":").upper()


# --------------------------------------------------------------------------- helpers


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CertificateError(f"{path}: {what} file not found") from None
    except IsADirectoryError:
        raise CertificateError(f"{path}: is a folder; pass the {what} file") from None
    except OSError as exc:
        raise CertificateError(f"{path}: cannot read the {what}: {exc.strerror}") from None


def _pem_labels(data: bytes) -> set[str]:
    return {
        match.decode("ascii", "replace")
        for match in re.findall(rb"-----BEGIN ([A-Z0-9 ]+)-----", data)
    }


def _not_pem_reason(data: bytes, labels: set[str], wanted: str) -> str:
    if not data.strip():
        return f"the file is empty; expected a PEM {wanted}"
    if any(label.endswith("PRIVATE KEY") for label in labels):
        return f"holds a private key, not a {wanted}; did you swap the certificate and the key?"
    if "CERTIFICATE" in labels:
        return f"holds a certificate, not a {wanted}; did you swap the certificate and the key?"
    if labels:
        return f"holds a PEM '{sorted(labels)[0]}', not a {wanted}"
    if data[:1] == b"\x30":
        return (
            f"a binary (DER) file, not PEM; convert it with `openssl "
            f"{'x509' if wanted == 'certificate' else 'pkey'} -inform der -in FILE -out FILE.pem`"
        )
    return f"not a PEM {wanted} (no '-----BEGIN' line)"


def _refuse_overwrite(paths: Sequence[Path], force: bool, why: str) -> None:
    existing = [path for path in paths if path.exists()]
    if existing and not force:
        names = ", ".join(str(path) for path in existing)
        raise CertificateError(
            f"{names}: already exist{'s' if len(existing) == 1 else ''} "
            f"and {why}; choose another --out, or pass --force to replace"
        )


def _make_private_dir(path: Path) -> None:
    """Create the output folder owner-only (it holds private keys); leave an existing one be."""
    if path.exists() and not path.is_dir():
        raise CertificateError(f"{path}: is a file; choose a folder for --out")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def _check_days(days: int) -> None:
    if days < 1:
        raise CertificateError(f"--days must be at least 1 (got {days})")


def _valid_host(host: str) -> str:
    name = host.strip().lower()
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        pass
    else:
        raise CertificateError(f"--host {host!r} is an IP address; pass it with --ip")
    if not name.isascii():
        raise CertificateError(
            f"--host {host!r} is not ASCII; pass the IDNA form (xn--...) of the name"
        )
    labels = name.split(".")
    if len(name) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise CertificateError(
            f"--host {host!r} is not a valid DNS name: labels of 1-63 letters, digits and "
            "hyphens separated by dots, no leading or trailing hyphen, no scheme, port or path "
            "(e.g. --host fl.consortium.example)"
        )
    return name


def _valid_ip(ip: str) -> IPAddress:
    try:
        return ipaddress.ip_address(ip.strip().strip("[]"))
    except ValueError:
        raise CertificateError(
            f"--ip {ip!r} is not an IPv4 or IPv6 address (e.g. --ip 10.0.0.5); "
            "pass host names with --host"
        ) from None


def _covers(host: str, dns_names: Sequence[str], addresses: Sequence[IPAddress]) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")) in addresses
    except ValueError:
        pass
    wanted = host.lower().rstrip(".")
    for name in (name.lower() for name in dns_names):
        if name == wanted:
            return True
        if name.startswith("*.") and wanted.split(".", 1)[-1] == name[2:] and "." in wanted:
            return True
    return False


def _san(certificate: x509.Certificate) -> tuple[list[str], list[IPAddress]]:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    # An IPAddress general name may hold a network only in name constraints, never
    # in a subject alternative name: what is not one address covers no host.
    addresses = [
        address
        for address in san.get_values_for_type(x509.IPAddress)
        if isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address)
    ]
    return san.get_values_for_type(x509.DNSName), addresses


def _extended_key_usage(certificate: x509.Certificate) -> list[x509.ObjectIdentifier]:
    try:
        return list(certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return []


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        return certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _issuing_root(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
) -> x509.Certificate:
    top = intermediates[-1] if intermediates else leaf
    return next((c for c in roots if c.subject == top.issuer), roots[0])


def _authority_key_id(
    ca_cert: x509.Certificate, ca_key: AnyPrivateKey
) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        # The issuer's public key is the CA key's (load_ca checked they pair); taken from
        # the key, it is typed as one that can issue certificates, as the argument must be.
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _spki(public_key: CertificatePublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _private_pem(key: AnyPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False


def _loose_mode(path: Path) -> int | None:
    """The file's permission bits when group or others may read it, else None."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None
    return mode if mode & 0o077 else None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _date(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")
