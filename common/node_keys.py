"""A node's authentication key pair: made on the node, its public half enrolled at the coordinator.

Flower's SuperLink (with `--enable-supernode-auth`) admits only SuperNodes
whose public key was registered with `flwr supernode register`; each
SuperNode signs its requests with the private key. The formats are Flower's:

- private key `node.key`: OpenSSH private-key format (BEGIN OPENSSH PRIVATE
  KEY), unencrypted, 0600: `flower-supernode --auth-supernode-private-key`
  reads it with `cryptography`'s `load_ssh_private_key(data, None)` and
  needs an EC key (PEM/PKCS8 is refused there);
- public key `node.pub`: one OpenSSH line (`ecdsa-sha2-nistp384 AAAA...
  comment`), which `flwr supernode register` loads with
  `load_ssh_public_key` and accepts on a NIST curve only.

The curve is P-384, the one Flower itself generates. The key pair is made
on the node and the private key never leaves it; the operators compare the
SHA-256 fingerprint (as `ssh-keygen -l` prints it) over a second channel
so that nobody can swap the public key on its way to the coordinator.

This module is shared: the node makes and loads its keys, the coordinator
validates the public keys it is given.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from consortia.common.atomic import write_bytes_atomic
from consortia.common.errors import ConsortiaError

NODE_PRIVATE_KEY = "node.key"
NODE_PUBLIC_KEY = "node.pub"
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644

# Flower accepts these (supercore/primitives/asymmetric.py `uses_nist_ec_curve`) ...
_NIST_CURVES = (ec.SECP192R1, ec.SECP224R1, ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
# ... and OpenSSH can carry these three of them.
_SSH_EC_TYPES = ("ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521")
_OTHER_SSH_TYPES = {
    "ssh-rsa": "an RSA key",
    "ssh-dss": "a DSA key",
    "ssh-ed25519": "an Ed25519 key",
    "ssh-ed448": "an Ed448 key",
    "sk-ssh-ed25519@openssh.com": "a security-key (FIDO) Ed25519 key",
    "sk-ecdsa-sha2-nistp256@openssh.com": "a security-key (FIDO) ECDSA key",
}
_COMMENT = re.compile(r"^[\x21-\x7e]{0,128}$")  # printable ASCII, no spaces
_MAKE_KEYS = "create the node's key pair with `consortia node keys init`"


class NodeKeyError(ConsortiaError):
    """A node key cannot be created, read or accepted as asked."""


@dataclass(frozen=True)
class NodePublicKey:
    """A node's public key as the coordinator enrolls it."""

    line: str  # "ecdsa-sha2-nistp384 AAAA... [comment]", what node.pub holds
    key_type: str  # "ecdsa-sha2-nistp384"
    fingerprint: str  # "SHA256:<base64, no padding>", as `ssh-keygen -l` prints it
    comment: str = ""

    @property
    def pem(self) -> bytes:
        """The key as PEM SubjectPublicKeyInfo: the bytes Flower stores for a registered node."""
        key = serialization.load_ssh_public_key(self.line.encode("ascii"))
        return key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


@dataclass(frozen=True)
class NodeKeys:
    """Where a node's key pair lies, and its public half."""

    private_key: Path
    public_key: Path
    public: NodePublicKey


def public_key_path(private_key: Path) -> Path:
    """`node.key` → `node.pub`; any other name gets `.pub` appended (as ssh-keygen does)."""
    if private_key.suffix == ".key":
        return private_key.with_suffix(".pub")
    return private_key.with_name(private_key.name + ".pub")


def init_node_keys(key_dir: Path, force: bool = False, *, comment: str = "") -> NodeKeys:
    """Create `key_dir/node.key` (0600) and `key_dir/node.pub` (0644)."""
    return write_node_keys(key_dir / NODE_PRIVATE_KEY, force, comment=comment)


def write_node_keys(private_key: Path, force: bool = False, *, comment: str = "") -> NodeKeys:
    """Create a P-384 key pair at `private_key` and its `.pub` beside it.

    Refuses to replace an existing key unless `force`: the coordinator knows
    this node by its enrolled public key, and a new one locks the node out
    until the coordinator registers the new public key.
    """
    if not _COMMENT.match(comment):
        raise NodeKeyError(
            f"key comment {comment!r}: use up to 128 printable ASCII characters without spaces"
        )
    public_path = public_key_path(private_key)
    for path in (private_key, public_path):
        if path.is_dir():
            raise NodeKeyError(f"{path}: is a folder; the node key needs a file path")
    existing = [path for path in (private_key, public_path) if path.exists()]
    if existing and not force:
        raise NodeKeyError(
            f"{existing[0]}: a node key already exists. If the coordinator enrolled it, a "
            "new key locks this node out until the coordinator registers the new public key. "
            "Show the current one with `consortia node keys show`; to replace it on purpose, "
            "run again with --force and send the new public key to the coordinator"
        )
    key = ec.generate_private_key(ec.SECP384R1())
    private_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public_line = (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode("ascii")
    )
    if comment:
        public_line = f"{public_line} {comment}"
    if private_key.parent.exists() and not private_key.parent.is_dir():
        raise NodeKeyError(f"{private_key.parent}: is a file; the node key needs a folder")
    private_key.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_bytes_atomic(private_key, private_bytes, mode=PRIVATE_MODE)
    write_bytes_atomic(public_path, (public_line + "\n").encode("ascii"), mode=PUBLIC_MODE)
    return NodeKeys(private_key, public_path, parse_node_public_key(public_line, str(public_path)))


def load_node_private_key(path: Path) -> NodePublicKey:
    """Check `path` is a key `flower-supernode` accepts; return its public half.

    Reads it exactly as Flower's SuperNode does (`load_ssh_private_key(data,
    None)`, EC only), and adds the curve check Flower applies at enrollment.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise NodeKeyError(f"{path}: no node key; {_MAKE_KEYS}") from None
    except IsADirectoryError:
        raise NodeKeyError(f"{path}: is a folder, not the node's private key") from None
    except OSError as exc:
        raise NodeKeyError(f"{path}: cannot read the node key: {exc.strerror}") from None
    if b"-----BEGIN OPENSSH PRIVATE KEY-----" not in data:
        if re.search(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----", data):
            raise NodeKeyError(
                f"{path}: a PEM private key; flower-supernode reads keys in OpenSSH format "
                f"(BEGIN OPENSSH PRIVATE KEY): convert it with `ssh-keygen -p -N '' -f {path}` "
                f"or {_MAKE_KEYS} --force (and enroll the new public key)"
            )
        if data.lstrip().startswith((b"ecdsa-", b"ssh-", b"sk-")):
            raise NodeKeyError(
                f"{path}: a public key; the node's private key (node.key) belongs here"
            )
        raise NodeKeyError(f"{path}: not an OpenSSH private key; {_MAKE_KEYS}")
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except TypeError:  # encrypted, and no passphrase given
        raise NodeKeyError(
            f"{path}: the node key has a passphrase, which flower-supernode cannot enter; "
            f"remove it (`ssh-keygen -p -N '' -f {path}`) and keep the file at mode 0600"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise NodeKeyError(
            f"{path}: the node key is corrupt or of an unsupported type; restore it from "
            f"a backup, or {_MAKE_KEYS} --force (and enroll the new public key)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, _NIST_CURVES):
        raise NodeKeyError(
            f"{path}: not an ECDSA key on a NIST curve; Flower's SuperNode authentication "
            f"needs one: {_MAKE_KEYS} --force (and enroll the new public key)"
        )
    line = (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode("ascii")
    )
    return parse_node_public_key(line, str(path))


def load_node_public_key(text_or_path: str | Path) -> NodePublicKey:
    """Validate a node's public key given to the coordinator: a `node.pub` file or its line.

    A `Path` is read; a `str` is read as a file when one exists at that
    path, and taken as the key itself when it looks like one (it contains a
    space or a PEM header). Accepts what `flwr supernode register` accepts:
    an OpenSSH ECDSA key on a NIST curve.
    """
    looks_like_key = isinstance(text_or_path, str) and (
        " " in text_or_path.strip() or "-----BEGIN" in text_or_path
    )
    if looks_like_key and not _is_file(str(text_or_path)):
        return parse_node_public_key(str(text_or_path), "the public key")
    path = Path(text_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NodeKeyError(
            f"{path}: no such file; pass the node's node.pub, or the line it holds"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not a text file"
        raise NodeKeyError(f"{path}: cannot read the public key: {reason}") from None
    return parse_node_public_key(text, str(path))


def parse_node_public_key(text: str, source: str) -> NodePublicKey:
    """Parse one OpenSSH public key line; `source` names it in error messages."""
    if "PRIVATE KEY" in text:
        raise NodeKeyError(
            f"{source}: this is a PRIVATE key; never send it anywhere. Send node.pub "
            "instead, and since the private key left the node, make a new pair "
            "(`consortia node keys init --force`) and enroll its public key"
        )
    if "-----BEGIN" in text:
        raise NodeKeyError(
            f"{source}: a PEM public key; Flower enrolls keys in OpenSSH format: send "
            "the one line of node.pub (`consortia node keys show` prints it)"
        )
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != 1:
        raise NodeKeyError(
            f"{source}: expected one public key line (ecdsa-sha2-nistp384 AAAA...), "
            f"found {len(lines)} lines"
        )
    fields = lines[0].split(None, 2)
    key_type = fields[0]
    if key_type in _OTHER_SSH_TYPES:
        raise NodeKeyError(
            f"{source}: {_OTHER_SSH_TYPES[key_type]}; Flower authenticates nodes with "
            "ECDSA keys on a NIST curve (ecdsa-sha2-nistp384): on the node, run "
            "`consortia node keys init` to create one"
        )
    if key_type not in _SSH_EC_TYPES or len(fields) < 2:
        raise NodeKeyError(
            f"{source}: not an OpenSSH public key (expected 'ecdsa-sha2-nistp384 AAAA...'); "
            "send the line of the node's node.pub, as `consortia node keys show` prints it"
        )
    try:
        blob = base64.b64decode(fields[1], validate=True)
        key = serialization.load_ssh_public_key(f"{key_type} {fields[1]}".encode("ascii"))
    except (binascii.Error, ValueError, UnsupportedAlgorithm):
        raise NodeKeyError(
            f"{source}: the {key_type} key is damaged (its base64 part does not decode); "
            "copy the whole line of node.pub again"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, _NIST_CURVES):
        raise NodeKeyError(f"{source}: not an ECDSA key on a NIST curve")
    comment = fields[2] if len(fields) == 3 else ""
    canonical = key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode("ascii")
    return NodePublicKey(
        line=f"{canonical} {comment}".strip(),
        key_type=key_type,
        fingerprint=ssh_fingerprint(blob),
        comment=comment,
    )


def pem_fingerprint(pem: bytes) -> str | None:
    """The same `SHA256:` fingerprint for a key in PEM (as Flower sends and stores it)."""
    try:
        key = serialization.load_pem_public_key(pem)
        line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None
    return ssh_fingerprint(base64.b64decode(line.split()[1]))


def ssh_fingerprint(blob: bytes) -> str:
    """`SHA256:` + unpadded base64 of the key blob's SHA-256, as `ssh-keygen -l` prints it."""
    digest = hashlib.sha256(blob).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def loose_mode(path: Path) -> int | None:
    """The file's permission bits when group or others may read it, else None."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None
    return mode if mode & 0o077 else None


def _is_file(text: str) -> bool:
    if "\n" in text or len(text) > 4096:
        return False
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # a name too long, or a NUL byte
        return False
