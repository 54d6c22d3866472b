"""Key material: the coordinator's CA and TLS certificate, the nodes' authentication keys.

What a wrong file costs in production is a node that cannot connect, or
worse, one that trusts the wrong server; so every certificate is checked the
way TLS clients check it (SANs, EKU, chain to the CA, validity), node keys
are loaded with Flower's own loaders, and a real TLS handshake (Python's
`ssl`, as Flower's HTTPS clients use it, and gRPC) runs against the issued
certificate.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import ipaddress
import os
import shutil
import socket
import ssl
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CliRunner, one_cli_error
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from consortia.common.node_keys import (
    NodeKeyError,
    init_node_keys,
    load_node_private_key,
    load_node_public_key,
)
from consortia.common.pki import (
    CertificateError,
    check_server_certificate,
    create_ca,
    issue_server_certificate,
    load_ca,
)

HOSTS = ["localhost", "fl.consortium.example"]
IPS = ["127.0.0.1", "::1"]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _ext(certificate: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.Extension:
    return certificate.extensions.get_extension_for_class(kind)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A CA in `ca/` and a SuperLink certificate in `tls/`; returns tmp_path."""
    create_ca(tmp_path / "ca", "Test consortium CA", days=30)
    issue_server_certificate(tmp_path / "ca", tmp_path / "tls", HOSTS, IPS, days=10)
    return tmp_path


# --------------------------------------------------------------------------- CA


def test_ca_extensions_and_modes(tmp_path: Path) -> None:
    before = dt.datetime.now(dt.UTC)
    authority = create_ca(tmp_path / "ca", "Test consortium CA", days=30)
    certificate = _cert(authority.certificate)
    assert certificate.subject == certificate.issuer
    assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "Test consortium CA"
    )
    constraints = _ext(certificate, x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = _ext(certificate, x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    ski = _ext(certificate, x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(certificate.public_key())
    key = certificate.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP384R1)
    certificate.verify_directly_issued_by(certificate)
    assert certificate.not_valid_before_utc <= before
    assert abs(certificate.not_valid_after_utc - (before + dt.timedelta(days=30))) < dt.timedelta(
        minutes=1
    )
    assert _mode(authority.certificate) == 0o644
    assert _mode(authority.private_key) == 0o600
    assert _mode(tmp_path / "ca") == 0o700
    assert authority.info.fingerprint.startswith("SHA256:") and len(authority.info.fingerprint) == (
        7 + 32 * 3 - 1
    )
    assert not list((tmp_path / "ca").glob(".*.tmp"))


def test_ca_refuses_to_overwrite(tmp_path: Path) -> None:
    first = create_ca(tmp_path, days=30)
    original = first.private_key.read_bytes()
    with pytest.raises(CertificateError, match=r"already exist.*--force"):
        create_ca(tmp_path, days=30)
    assert first.private_key.read_bytes() == original
    second = create_ca(tmp_path, days=30, force=True)
    assert second.private_key.read_bytes() != original
    assert _mode(second.private_key) == 0o600


# --------------------------------------------------------------------------- server certificate


def test_server_certificate_extensions(pki: Path) -> None:
    before = dt.datetime.now(dt.UTC)
    certificate = _cert(pki / "tls" / "server.crt")
    ca_certificate = _cert(pki / "ca" / "ca.crt")
    san = _ext(certificate, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == HOSTS
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(ip) for ip in IPS]
    constraints = _ext(certificate, x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    usage = _ext(certificate, x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    assert list(_ext(certificate, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    aki = _ext(certificate, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == _ext(ca_certificate, x509.SubjectKeyIdentifier).value.digest
    assert certificate.issuer == ca_certificate.subject
    certificate.verify_directly_issued_by(ca_certificate)
    # Valid from 5 minutes ago (clock skew) for the days asked.
    skew = before - certificate.not_valid_before_utc
    assert dt.timedelta(minutes=4) < skew <= dt.timedelta(minutes=5, seconds=2)
    lifetime = certificate.not_valid_after_utc - before
    assert abs(lifetime - dt.timedelta(days=10)) < dt.timedelta(minutes=1)
    assert _mode(pki / "tls" / "server.key") == 0o600
    assert _mode(pki / "tls" / "server.crt") == 0o644
    assert _mode(pki / "tls" / "ca.crt") == 0o644
    assert (pki / "tls" / "ca.crt").read_bytes() == (pki / "ca" / "ca.crt").read_bytes()


def test_server_certificate_verifies_against_its_ca_only(pki: Path) -> None:
    certificate = _cert(pki / "tls" / "server.crt")
    create_ca(pki / "other", "Test consortium CA", days=30)  # same name, other key
    with pytest.raises(Exception):  # noqa: B017  # InvalidSignature
        certificate.verify_directly_issued_by(_cert(pki / "other" / "ca.crt"))
    checked = check_server_certificate(
        pki / "tls" / "server.crt", pki / "tls" / "server.key", pki / "ca" / "ca.crt"
    )
    assert checked.warnings == ()
    assert checked.info.dns_names == tuple(HOSTS)
    with pytest.raises(CertificateError, match="signature does not verify"):
        check_server_certificate(
            pki / "tls" / "server.crt", pki / "tls" / "server.key", pki / "other" / "ca.crt"
        )


def test_server_certificate_refuses_to_overwrite(pki: Path) -> None:
    key = (pki / "tls" / "server.key").read_bytes()
    with pytest.raises(CertificateError, match=r"server\.crt.*server\.key.*--force"):
        issue_server_certificate(pki / "ca", pki / "tls", ["localhost"], [], days=5)
    assert (pki / "tls" / "server.key").read_bytes() == key
    issue_server_certificate(pki / "ca", pki / "tls", ["localhost"], [], days=5, force=True)
    assert (pki / "tls" / "server.key").read_bytes() != key


@pytest.mark.parametrize(
    ("hosts", "ips", "message"),
    [
        (["https://fl.example.org"], [], "is not a valid DNS name"),
        (["fl.example.org:9092"], [], "is not a valid DNS name"),
        (["-bad.example"], [], "is not a valid DNS name"),
        (["a" * 64 + ".example"], [], "is not a valid DNS name"),
        (["with space.example"], [], "is not a valid DNS name"),
        (["bücher.example"], [], "pass the IDNA form"),
        (["10.0.0.5"], [], "is an IP address; pass it with --ip"),
        ([], ["10.0.0.300"], "is not an IPv4 or IPv6 address"),
        ([], ["fl.example.org"], "is not an IPv4 or IPv6 address"),
        ([], [], "no host name or IP address"),
    ],
)
def test_server_certificate_refuses_bad_names(
    pki: Path, hosts: list[str], ips: list[str], message: str
) -> None:
    with pytest.raises(CertificateError, match=message):
        issue_server_certificate(pki / "ca", pki / "new", hosts, ips, days=5)
    assert not (pki / "new").exists()


def test_server_certificate_cannot_outlive_its_ca(pki: Path) -> None:
    with pytest.raises(CertificateError, match=r"the CA expires on .* pass --days (29|30) or less"):
        issue_server_certificate(pki / "ca", pki / "new", ["localhost"], [], days=400)


def test_missing_or_mismatched_ca(pki: Path) -> None:
    with pytest.raises(CertificateError, match=r"ca\.crt: not found; create a CA with"):
        load_ca(pki / "nowhere")
    create_ca(pki / "other", days=30)
    (pki / "ca" / "ca.key").write_bytes((pki / "other" / "ca.key").read_bytes())
    with pytest.raises(CertificateError, match="this key does not belong to"):
        load_ca(pki / "ca")


# --------------------------------------------------------------------------- bring your own


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _build(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: int | None = None,  # path length of a CA certificate; None: a server certificate
    days: tuple[int, int] = (-1, 30),
    san: bool = True,
    eku: bool = True,
) -> x509.Certificate:
    """A certificate as another organisation's CA might issue it."""
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + dt.timedelta(days=days[0]))
        .not_valid_after(now + dt.timedelta(days=days[1]))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
    )
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(True, ca), True).add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
    else:
        builder = builder.add_extension(x509.BasicConstraints(False, None), True).add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), True
        )
        if san:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName("fl.hospital.example")]), False
            )
        if eku:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False
            )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, *certificates: x509.Certificate) -> Path:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates))
    return path


@pytest.fixture
def own_ca(tmp_path: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A hospital's own root CA (EC P-256, SHA-256: a different stack from ours)."""
    key = _key()
    root = _build("Hospital Root CA", key, None, key, ca=1)
    _write(tmp_path / "root.crt", root)
    return root, key


def test_own_ca_certificate_with_an_intermediate(tmp_path: Path, own_ca) -> None:  # type: ignore[no-untyped-def]
    root, root_key = own_ca
    mid_key = _key()
    intermediate = _build("Hospital Issuing CA", mid_key, root, root_key, ca=0)
    server_key = _key()
    server = _build("fl.hospital.example", server_key, intermediate, mid_key)
    (tmp_path / "server.key").write_bytes(_pem_key(server_key))
    (tmp_path / "server.key").chmod(0o600)
    chain = _write(tmp_path / "server.crt", server, intermediate)
    checked = check_server_certificate(
        chain, tmp_path / "server.key", tmp_path / "root.crt", hosts=["fl.hospital.example"]
    )
    assert checked.info.subject == "CN=fl.hospital.example"
    assert checked.ca_info.subject == "CN=Hospital Root CA"
    # Without the intermediate in the certificate file, the chain is broken.
    _write(tmp_path / "leaf.crt", server)
    with pytest.raises(CertificateError, match="append any intermediate CA certificates"):
        check_server_certificate(
            tmp_path / "leaf.crt", tmp_path / "server.key", tmp_path / "root.crt"
        )


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("expired", r"server\.crt: the certificate expired on \d{4}-\d\d-\d\d .*issue a new one"),
        ("not yet valid", r"not valid before .*check this machine's clock"),
        ("no SAN", r"no SubjectAlternativeName; clients check the SAN, not the CN"),
        ("no EKU", r"lacks serverAuth"),
        ("wrong key", r"server\.key: this key does not belong to .*server\.crt"),
        ("other CA", r"not issued by the CA in .*root\.crt \(issued by 'CN=Other CA'"),
        ("a CA", r"is a CA certificate, not a server certificate"),
        ("host not covered", r"does not cover 'fl\.other\.example' \(it covers fl\.hospital"),
        ("swapped", r"server\.key: holds a private key, not a certificate; did you swap"),
        ("garbage", r"server\.crt: not a PEM certificate \(no '-----BEGIN' line\)"),
        ("corrupt", r"server\.crt: the server certificate is corrupt"),
        ("DER", r"a binary \(DER\) file, not PEM; convert it with `openssl x509 -inform der"),
        ("empty", r"server\.crt: the file is empty"),
        ("encrypted key", r"server\.key: the server key is encrypted with a passphrase"),
        ("missing key", r"server\.key: server key file not found"),
    ],
)
def test_check_server_certificate_failures(tmp_path: Path, own_ca, case: str, message: str) -> None:  # type: ignore[no-untyped-def]
    root, root_key = own_ca
    server_key = _key()
    kwargs: dict[str, object] = {}
    if case == "expired":
        kwargs["days"] = (-30, -1)
    if case == "not yet valid":
        kwargs["days"] = (2, 30)
    if case == "no SAN":
        kwargs["san"] = False
    if case == "no EKU":
        kwargs["eku"] = False
    issuer, issuer_key = root, root_key
    if case == "other CA":
        issuer_key = _key()
        issuer = _build("Other CA", issuer_key, None, issuer_key, ca=0)
    if case == "a CA":
        kwargs["ca"] = 0
    server = _build("fl.hospital.example", server_key, issuer, issuer_key, **kwargs)  # type: ignore[arg-type]
    cert = _write(tmp_path / "server.crt", server)
    key = tmp_path / "server.key"
    key.write_bytes(_pem_key(_key() if case == "wrong key" else server_key))
    hosts = ["fl.other.example"] if case == "host not covered" else []
    if case == "swapped":
        cert, key = key, cert
    if case == "garbage":
        cert.write_bytes(b"this is not a certificate\n")
    if case == "corrupt":
        cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nMIIB!!!!\n-----END CERTIFICATE-----\n")
    if case == "DER":
        cert.write_bytes(server.public_bytes(serialization.Encoding.DER))
    if case == "empty":
        cert.write_bytes(b"")
    if case == "encrypted key":
        key.write_bytes(
            server_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            )
        )
    if case == "missing key":
        key.unlink()
    with pytest.raises(CertificateError, match=message):
        check_server_certificate(cert, key, tmp_path / "root.crt", hosts=hosts)


def test_check_reports_expiry_at_a_given_time_and_a_loose_key(pki: Path) -> None:
    cert, key, ca = pki / "tls" / "server.crt", pki / "tls" / "server.key", pki / "tls" / "ca.crt"
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=11)
    with pytest.raises(CertificateError, match="expired on"):
        check_server_certificate(cert, key, ca, now=later)
    key.chmod(0o644)
    (warning,) = check_server_certificate(cert, key, ca, hosts=["localhost", "::1"]).warnings
    assert "readable by other users (mode 0644); chmod 600" in warning


# --------------------------------------------------------------------------- TLS handshakes


@pytest.fixture
def tls_server(pki: Path) -> Iterator[int]:
    """A TLS server with the issued certificate on 127.0.0.1: answers `ok` to each client."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki / "tls" / "server.crt", pki / "tls" / "server.key")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            try:
                with context.wrap_socket(connection, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass  # the client refused our certificate

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    yield port
    stop.set()
    socket.create_connection(("127.0.0.1", port), timeout=5).close()  # wake accept()
    thread.join(timeout=5)
    listener.close()


def _handshake(port: int, ca: Path, server_name: str) -> bytes:
    context = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        return tls.recv(2)


def test_tls_handshake_with_the_issued_certificate(pki: Path, tls_server: int) -> None:
    for name in ("localhost", "127.0.0.1", "fl.consortium.example"):
        assert _handshake(tls_server, pki / "tls" / "ca.crt", name) == b"ok"
    with pytest.raises(ssl.SSLCertVerificationError, match=r"Hostname mismatch"):
        _handshake(tls_server, pki / "tls" / "ca.crt", "other.example")
    create_ca(pki / "other", "Test consortium CA", days=30)
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        _handshake(tls_server, pki / "other" / "ca.crt", "localhost")


def test_grpc_handshake_with_the_issued_certificate(pki: Path) -> None:
    """The SuperLink's gRPC servers use the same certificate (BoringSSL, not OpenSSL)."""
    import grpc

    server = grpc.server(concurrent.futures.ThreadPoolExecutor(1))
    credentials = grpc.ssl_server_credentials(
        [((pki / "tls" / "server.key").read_bytes(), (pki / "tls" / "server.crt").read_bytes())]
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        for target, ca, ready in [
            (f"localhost:{port}", pki / "tls" / "ca.crt", True),
            (f"127.0.0.1:{port}", pki / "tls" / "ca.crt", True),
            (f"localhost:{port}", pki / "other" / "ca.crt", False),
        ]:
            if not ca.exists():
                create_ca(ca.parent, days=30)
            channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(ca.read_bytes()))
            try:
                grpc.channel_ready_future(channel).result(timeout=10 if ready else 1)
                connected = True
            except grpc.FutureTimeoutError:
                connected = False
            finally:
                channel.close()
            assert connected is ready, target
    finally:
        server.stop(None)


# --------------------------------------------------------------------------- node keys


def test_node_keys_are_what_flower_loads(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    keys = init_node_keys(tmp_path / "keys", comment="consortia-node-st-mary")
    assert keys.private_key == tmp_path / "keys" / "node.key"
    assert keys.public_key == tmp_path / "keys" / "node.pub"
    assert _mode(keys.private_key) == 0o600 and _mode(keys.public_key) == 0o644
    assert _mode(tmp_path / "keys") == 0o700
    assert keys.private_key.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert keys.public.line.startswith("ecdsa-sha2-nistp384 AAAA")
    assert keys.public.line.endswith(" consortia-node-st-mary")
    assert keys.public_key.read_text() == keys.public.line + "\n"

    # `flwr supernode register node.pub`: the bytes the SuperLink stores for the node ...
    registered = try_load_public_key(keys.public_key)
    assert registered == keys.public.pem
    # ... and `flower-supernode --auth-supernode-private-key node.key` signs with its pair.
    pair = _try_setup_client_authentication(
        argparse.Namespace(
            auth_supernode_private_key=str(keys.private_key), auth_supernode_public_key=None
        )
    )
    assert pair is not None
    private, public = pair
    assert isinstance(private.curve, ec.SECP384R1)
    assert (
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == registered
    )
    assert load_node_private_key(keys.private_key).fingerprint == keys.public.fingerprint
    assert load_node_public_key(keys.public_key) == keys.public


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs OpenSSH's ssh-keygen")
def test_fingerprint_is_ssh_keygens(tmp_path: Path) -> None:
    keys = init_node_keys(tmp_path)
    listed = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", str(keys.public_key)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert listed.split()[1] == keys.public.fingerprint
    assert keys.public.fingerprint.startswith("SHA256:") and "=" not in keys.public.fingerprint


def test_node_keys_refuse_to_overwrite(tmp_path: Path) -> None:
    first = init_node_keys(tmp_path)
    with pytest.raises(NodeKeyError, match=r"node\.key: a node key already exists.*locks"):
        init_node_keys(tmp_path)
    (tmp_path / "node.key").unlink()  # a lone node.pub is guarded too
    with pytest.raises(NodeKeyError, match=r"node\.pub: a node key already exists"):
        init_node_keys(tmp_path)
    second = init_node_keys(tmp_path, force=True)
    assert second.public.fingerprint != first.public.fingerprint
    assert _mode(second.private_key) == 0o600


def _ssh_line(key: object) -> str:
    return (
        key.public_key()  # type: ignore[attr-defined]
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )


def test_load_node_public_key_accepts_text_paths_and_nist_curves(tmp_path: Path) -> None:
    keys = init_node_keys(tmp_path)
    assert load_node_public_key(keys.public.line) == keys.public
    assert load_node_public_key(str(keys.public_key)) == keys.public
    assert load_node_public_key("\n  " + keys.public.line + "  \n\n") == keys.public
    p256 = load_node_public_key(_ssh_line(ec.generate_private_key(ec.SECP256R1())))
    assert p256.key_type == "ecdsa-sha2-nistp256"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: _ssh_line(rsa.generate_private_key(65537, 2048)),
            r"an RSA key; Flower authenticates nodes with ECDSA keys on a NIST curve",
        ),
        (
            lambda: _ssh_line(ed25519.Ed25519PrivateKey.generate()) + " me@laptop",
            r"an Ed25519 key; Flower authenticates nodes with ECDSA keys",
        ),
        (lambda: "hello world", r"not an OpenSSH public key \(expected 'ecdsa-sha2-nistp384"),
        (lambda: "ecdsa-sha2-nistp384 AAAA!!!not-base64", r"damaged .* copy the whole line"),
        (
            lambda: (
                "ecdsa-sha2-nistp384 " + _ssh_line(ed25519.Ed25519PrivateKey.generate()).split()[1]
            ),
            r"damaged",
        ),
        (
            lambda: (
                ec.generate_private_key(ec.SECP384R1())
                .public_key()
                .public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
                .decode()
            ),
            r"a PEM public key; Flower enrolls keys in OpenSSH format",
        ),
        (
            lambda: (
                ec.generate_private_key(ec.SECP384R1())
                .private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.OpenSSH,
                    serialization.NoEncryption(),
                )
                .decode()
            ),
            r"this is a PRIVATE key; never send it anywhere",
        ),
        (
            lambda: (
                _ssh_line(ec.generate_private_key(ec.SECP384R1()))
                + "\n"
                + _ssh_line(ec.generate_private_key(ec.SECP384R1()))
            ),
            r"expected one public key line .* found 2 lines",
        ),
    ],
    ids=["rsa", "ed25519", "garbage", "bad base64", "type mismatch", "pem", "private", "two"],
)
def test_load_node_public_key_rejects(tmp_path: Path, make, message: str) -> None:  # type: ignore[no-untyped-def]
    text = make()
    with pytest.raises(NodeKeyError, match=message):
        load_node_public_key(text)
    (tmp_path / "key.pub").write_text(text)
    with pytest.raises(NodeKeyError, match=message):
        load_node_public_key(tmp_path / "key.pub")


def test_load_node_public_key_missing_file(tmp_path: Path) -> None:
    with pytest.raises(NodeKeyError, match=r"nothere\.pub: no such file"):
        load_node_public_key(str(tmp_path / "nothere.pub"))


def test_load_node_private_key_rejects(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    with pytest.raises(NodeKeyError, match="no node key; create the node's key pair"):
        load_node_private_key(path)
    path.write_bytes(_pem_key(ec.generate_private_key(ec.SECP384R1())))
    with pytest.raises(NodeKeyError, match="a PEM private key; flower-supernode reads keys in"):
        load_node_private_key(path)
    path.write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(NodeKeyError, match="not an ECDSA key on a NIST curve"):
        load_node_private_key(path)
    path.write_text(
        "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n"
    )
    with pytest.raises(NodeKeyError, match="corrupt"):
        load_node_private_key(path)
    if shutil.which("ssh-keygen"):
        path.unlink()
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "secret", "-f", str(path)],
            check=True,
        )
        with pytest.raises(NodeKeyError, match="has a passphrase"):
            load_node_private_key(path)


# --------------------------------------------------------------------------- command line


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_cli_provision(tmp_path: Path, consortia_cli: CliRunner) -> None:
    out = _ok(consortia_cli("provision", "ca", "--out", "ca", "--name", "Test CA", cwd=tmp_path))
    ca_fingerprint = _cert(tmp_path / "ca" / "ca.crt").fingerprint(hashes.SHA256()).hex(":")
    assert "wrote ca/ca.crt" in out and "wrote ca/ca.key" in out
    assert f"fingerprint: SHA256:{ca_fingerprint.upper()}" in out
    out = _ok(
        consortia_cli(
            "provision", "coordinator", "--ca", "ca", "--out", "tls",
            "--host", "localhost", "--host", "fl.example.org", "--ip", "127.0.0.1",
            cwd=tmp_path,
        )
    )  # fmt: skip
    for name in ("server.crt", "server.key", "ca.crt"):
        assert f"wrote tls/{name}" in out
    assert "localhost, fl.example.org, 127.0.0.1" in out
    assert f"issued by CN=Test CA (SHA256:{ca_fingerprint.upper()})" in out
    server_fingerprint = _cert(tmp_path / "tls" / "server.crt").fingerprint(hashes.SHA256())
    assert f"fingerprint: SHA256:{server_fingerprint.hex(':').upper()}" in out
    out = _ok(
        consortia_cli(
            "provision", "check", "--cert", "tls/server.crt", "--key", "tls/server.key",
            "--ca", "tls/ca.crt", "--host", "fl.example.org", cwd=tmp_path,
        )
    )  # fmt: skip
    assert "tls/server.crt: usable by the SuperLink" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ca", "--out", "ca"], "ca/ca.crt, ca/ca.key: already exist"),
        (
            ["coordinator", "--ca", "ca", "--out", "tls", "--host", "fl.example.org:9092"],
            "--host 'fl.example.org:9092' is not a valid DNS name",
        ),
        (
            ["coordinator", "--ca", "ca", "--out", "tls", "--ip", "10.0.0.300"],
            "--ip '10.0.0.300' is not an IPv4 or IPv6 address",
        ),
        (
            ["coordinator", "--ca", "nowhere", "--out", "tls", "--host", "localhost"],
            "nowhere/ca.crt: not found; create a CA with `consortia provision ca --out nowhere`",
        ),
        (
            ["check", "--cert", "ca/ca.key", "--key", "ca/ca.key", "--ca", "ca/ca.crt"],
            "ca/ca.key: holds a private key, not a certificate",
        ),
        (
            ["check", "--cert", "ca/ca.crt", "--key", "ca/ca.key", "--ca", "ca/ca.crt"],
            "ca/ca.crt: is a CA certificate, not a server certificate",
        ),
    ],
    ids=["ca exists", "bad host", "bad ip", "no ca", "swapped", "ca as server"],
)
def test_cli_provision_errors(
    tmp_path: Path, consortia_cli: CliRunner, args: list[str], message: str
) -> None:
    create_ca(tmp_path / "ca", days=30)
    assert message in one_cli_error(consortia_cli("provision", *args, cwd=tmp_path))


def _node_toml(folder: Path, superlink: str) -> Path:
    path = folder / "node.toml"
    path.write_text(f'name = "st-mary"\nstate_dir = "state"\n[superlink]\n{superlink}')
    return path


def test_cli_node_keys(tmp_path: Path, consortia_cli: CliRunner) -> None:
    node_toml = _node_toml(tmp_path, 'address = "fl.example.org:9092"\n')
    message = one_cli_error(
        consortia_cli("node", "keys", "show", "--node", "node.toml", cwd=tmp_path)
    )
    assert f"{tmp_path}/state/keys/node.key: no node key" in message
    out = _ok(consortia_cli("node", "keys", "init", "--node", str(node_toml), cwd=tmp_path))
    key = tmp_path / "state" / "keys" / "node.key"
    public = load_node_private_key(key)
    assert public.fingerprint in out
    (line,) = [x for x in out.splitlines() if x.startswith("ecdsa-sha2-nistp384 ")]
    assert load_node_public_key(line).fingerprint == public.fingerprint
    assert line.endswith(" consortia-node-st-mary")
    shown = _ok(consortia_cli("node", "keys", "show", "--node", "node.toml", cwd=tmp_path))
    assert line in shown.splitlines() and public.fingerprint in shown
    message = one_cli_error(
        consortia_cli("node", "keys", "init", "--node", "node.toml", cwd=tmp_path)
    )
    assert "a node key already exists" in message and "--force" in message
    assert load_node_private_key(key) == public  # untouched
    out = _ok(consortia_cli("node", "keys", "init", "--node", "node.toml", "--force", cwd=tmp_path))
    assert load_node_private_key(key).fingerprint != public.fingerprint


def test_cli_node_keys_at_a_configured_path(tmp_path: Path, consortia_cli: CliRunner) -> None:
    _node_toml(tmp_path, 'address = "fl.example.org:9092"\nauth_private_key = "secrets/st-mary"\n')
    _ok(consortia_cli("node", "keys", "init", "--node", "node.toml", cwd=tmp_path))
    assert _mode(tmp_path / "secrets" / "st-mary") == 0o600
    assert (tmp_path / "secrets" / "st-mary.pub").is_file()
    assert not (tmp_path / "state").exists()


@pytest.fixture
def fake_supernode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `flower-supernode` first on PATH that prints the arguments it was started with.

    `node start --stock` runs it as is; the default path passes the same
    SuperNode arguments to `consortia.client.supernode_launcher` (see
    `node_commands`).
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "flower-supernode"
    script.write_text('#!/bin/sh\nfor a in "$@"; do echo "ARG $a"; done\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return script


def _started_args(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert result.returncode == 0, result.stdout + result.stderr
    return [line[4:] for line in result.stdout.splitlines() if line.startswith("ARG ")]


def test_cli_node_start_passes_the_key(
    tmp_path: Path, consortia_cli: CliRunner, fake_supernode: Path
) -> None:
    create_ca(tmp_path / "ca", days=30)
    _node_toml(tmp_path, 'address = "fl.example.org:9092"\nroot_certificates = "ca/ca.crt"\n')
    message = one_cli_error(consortia_cli("node", "start", "--node", "node.toml", cwd=tmp_path))
    assert f"{tmp_path}/state/keys/node.key: no node key" in message
    assert "run `consortia node keys init --node node.toml`, send the public key" in message
    _ok(consortia_cli("node", "keys", "init", "--node", "node.toml", cwd=tmp_path))
    args = _started_args(
        consortia_cli("node", "start", "--stock", "--node", "node.toml", cwd=tmp_path)
    )
    flag = args.index("--auth-supernode-private-key")
    assert args[flag + 1] == str(tmp_path / "state" / "keys" / "node.key")
    assert args[args.index("--root-certificates") + 1] == str(tmp_path / "ca" / "ca.crt")
    assert "--insecure" not in args
    # A key flower-supernode could not read fails here, with the fix.
    (tmp_path / "state" / "keys" / "node.key").write_text("garbage\n")
    message = one_cli_error(consortia_cli("node", "start", "--node", "node.toml", cwd=tmp_path))
    assert "node.key: not an OpenSSH private key" in message


def test_cli_node_start_insecure_needs_no_key(
    tmp_path: Path, consortia_cli: CliRunner, fake_supernode: Path
) -> None:
    _node_toml(tmp_path, 'address = "127.0.0.1:9092"\ninsecure = true\n')
    args = _started_args(
        consortia_cli("node", "start", "--stock", "--node", "node.toml", cwd=tmp_path)
    )
    assert "--insecure" in args and "--auth-supernode-private-key" not in args
