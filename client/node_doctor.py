"""`consortia node doctor`: what a node needs before its first job, checked, with the fix.

Each check ends in one `Finding`: ok, a warning, a problem (what is wrong
and how to fix it, in one sentence), or skipped (why). In order:

- **certificate**: the coordinator's TLS certificate, fetched from the
  SuperLink address, must chain to the node's `root_certificates` and cover
  the host dialled, as Flower's SuperNode checks it (one TLS handshake with
  the node's trust); an expired certificate, one from another CA, one that
  does not cover the host are told apart. The CA file itself is read, and
  any certificate expiring within 30 days is a warning.
- **node key**: the private key flower-supernode signs with, readable and of
  the right kind, not readable by others.
- **enrollment**: the coordinator is asked (`consortia.common.node_check`:
  a signed request its gatekeeper answers without activating the node)
  whether it enrolled this key.
- **clock**: the coordinator's clock from the same answer; Flower refuses a
  node whose clock runs more than 5 s ahead.
- **disk**: free space where the ledger and audit log are written.
- **ledger**: the privacy ledger opens and reads.
- **dataset NAME**: every registered or served dataset reads, validates and
  matches its registered fingerprint (as a job would load it).
- **GPU**: for training.device 'auto' or 'cuda': torch sees a GPU and runs on
  it; a GPU torch cannot use is a problem (torch is imported only here).
- **versions**: consortia and Flower must match the coordinator's (torch
  differing is a warning).

Nothing here changes the node's state, nor the coordinator's (which records
the check in its audit log).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import ssl
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError

from consortia.client.ledger import LedgerError, PrivacyLedger, ledger_path
from consortia.client.link_probe import presented_certificate, split_address, verified_handshake
from consortia.client.node_config import DEFAULT_AUTH_PRIVATE_KEY, NodeConfig
from consortia.common.errors import ConsortiaError
from consortia.common.node_check import (
    AHEAD_TOLERANCE_S,
    NODE_CHECK_PATH,
    NodeCheckAnswer,
    signed_headers,
)
from consortia.common.node_keys import load_node_private_key, loose_mode
from consortia.common.pki import CertificateError, expiry_notice, load_certificates
from consortia.common.versions import Mismatch, installed_versions, version_mismatches

MIN_FREE_BYTES = 256 * 2**20  # below this the ledger's next write may fail
LOW_FREE_BYTES = 2 * 2**30
CLOCK_WARNING_S = 1.0
CHECK_TIMEOUT_S = 10.0
# OpenSSL's verification results the doctor tells apart (X509_V_ERR_*).
_EXPIRED, _NOT_YET_VALID = 10, 9
_HOST_MISMATCH = frozenset({62, 64})  # hostname, IP address


class Verdict(StrEnum):
    OK = "ok"
    WARNING = "warning"
    PROBLEM = "problem"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class Finding:
    """One check's outcome; a problem's text says what to do about it."""

    check: str
    verdict: Verdict
    text: str

    def __str__(self) -> str:
        return f"{self.verdict:<8}{self.check}: {self.text}"


class Device(StrEnum):
    """The training device the node's jobs ask for (`[training] device`)."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


@dataclass(frozen=True)
class _Link:
    """How to reach the coordinator, once its certificate is trusted (or the link is plain)."""

    base_url: str
    verify: ssl.SSLContext | bool


def diagnose(config: NodeConfig, node_toml: Path, device: Device = Device.AUTO) -> list[Finding]:
    """Every check, in order (see the module)."""
    findings, link = _certificate(config)
    key_findings, key = _node_key(config, node_toml)
    findings += key_findings
    findings += _coordinator(config, node_toml, link, key)
    findings += _disk(config)
    findings.append(_ledger(config))
    findings += _datasets(config, node_toml)
    findings.append(_gpu(device))
    return findings


# ------------------------------------------------------------------ certificate


def _certificate(config: NodeConfig) -> tuple[list[Finding], _Link | None]:
    link = config.superlink
    if link.insecure:
        skipped = Finding(
            "certificate",
            Verdict.SKIPPED,
            "insecure = true: plain HTTP, no certificate (local development only)",
        )
        return [skipped], _Link(f"http://{link.address}", False)
    parsed = split_address(link.address)
    if parsed is None:
        problem = f"[superlink] address = {link.address!r} is not HOST:PORT; write it so"
        return [Finding("certificate", Verdict.PROBLEM, problem)], None
    host, port = parsed
    findings: list[Finding] = []
    roots = link.root_certificates
    if roots is None:
        context = ssl.create_default_context()
        trusted = "the system's CAs"
    else:
        try:
            for ca in load_certificates(roots, "CA certificate"):
                notice = expiry_notice(ca, f"the CA certificate in {roots}")
                if notice is not None:
                    verdict = Verdict.PROBLEM if "expired" in notice else Verdict.WARNING
                    findings.append(Finding("certificate", verdict, f"{notice}; {_NEW_CA}"))
            context = ssl.create_default_context(cafile=str(roots))
        except (CertificateError, ssl.SSLError, OSError) as exc:
            text = exc.message if isinstance(exc, CertificateError) else str(exc)
            return [Finding("certificate", Verdict.PROBLEM, f"{text}; {_SET_ROOTS}")], None
        trusted = str(roots)
    try:
        leaf = x509.load_der_x509_certificate(presented_certificate(host, port, CHECK_TIMEOUT_S))
    except OSError as exc:
        return [*findings, _unreachable(link.address, exc)], None
    try:
        verified_handshake(host, port, context, CHECK_TIMEOUT_S)
    except ssl.SSLCertVerificationError as exc:
        return [*findings, _untrusted(exc, leaf, host, trusted)], None
    except OSError as exc:
        return [*findings, _unreachable(link.address, exc)], None
    findings.append(
        Finding(
            "certificate",
            Verdict.OK,
            f"the coordinator's certificate chains to {trusted}, covers {host}, valid until "
            f"{leaf.not_valid_after_utc:%Y-%m-%d}",
        )
    )
    notice = expiry_notice(leaf, "the coordinator's certificate")
    if notice is not None:
        findings.append(Finding("certificate", Verdict.WARNING, f"{notice}; {_RENEW}"))
    return findings, _Link(f"https://{link.address}", context)


_RENEW = (
    "ask the coordinator's operator to issue a new one (`consortia provision coordinator`) "
    "and restart the coordinator"
)
_SET_ROOTS = (
    "set [superlink] root_certificates in node.toml to the consortium's ca.crt (the CA the "
    "coordinator was provisioned with)"
)
_NEW_CA = "ask the coordinator's operator for the consortium's new ca.crt"


def _untrusted(
    exc: ssl.SSLCertVerificationError, leaf: x509.Certificate, host: str, trusted: str
) -> Finding:
    """Why the node's trust refuses the certificate, told from OpenSSL's verification code."""
    now = dt.datetime.now(dt.UTC)
    issuer = leaf.issuer.rfc4514_string()
    if exc.verify_code == _EXPIRED and leaf.not_valid_after_utc <= now:
        text = f"the coordinator's certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d}"
        return Finding("certificate", Verdict.PROBLEM, f"{text}; {_RENEW}")
    if exc.verify_code == _NOT_YET_VALID and leaf.not_valid_before_utc > now:
        text = (
            f"the coordinator's certificate is valid only from {leaf.not_valid_before_utc} UTC: "
            "this machine's clock is behind, or the certificate was dated ahead; synchronise "
            "the clock (NTP), or wait"
        )
        return Finding("certificate", Verdict.PROBLEM, text)
    if exc.verify_code in _HOST_MISMATCH:
        text = (
            f"the coordinator's certificate does not cover {host}; set [superlink] address to "
            "a host name its certificate covers, or ask its operator to reissue it with "
            f"{host} (`consortia provision coordinator --host/--ip`)"
        )
        return Finding("certificate", Verdict.PROBLEM, text)
    text = (
        f"the coordinator's certificate (issued by '{issuer}') does not chain to {trusted} "
        f"({exc.verify_message}); {_SET_ROOTS}"
    )
    return Finding("certificate", Verdict.PROBLEM, text)


def _unreachable(address: str, exc: OSError) -> Finding:
    text = (
        f"cannot reach the coordinator at {address} ({exc.strerror or exc}); check [superlink] "
        "address, that the coordinator runs, and that the network lets this machine through"
    )
    return Finding("coordinator", Verdict.PROBLEM, text)


# ------------------------------------------------------------------ node key


def _node_key(
    config: NodeConfig, node_toml: Path
) -> tuple[list[Finding], ec.EllipticCurvePrivateKey | None]:
    if config.superlink.insecure:
        text = "insecure = true: the node does not authenticate (local development only)"
        return [Finding("node key", Verdict.SKIPPED, text)], None
    path = config.superlink.auth_private_key or config.state_dir / DEFAULT_AUTH_PRIVATE_KEY
    try:
        public = load_node_private_key(path)
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (ConsortiaError, OSError, ValueError) as exc:
        text = exc.message if isinstance(exc, ConsortiaError) else str(exc)
        if not path.exists():
            text = f"{path}: no node key; run `consortia node keys init --node {node_toml}`"
        return [Finding("node key", Verdict.PROBLEM, text)], None
    assert isinstance(key, ec.EllipticCurvePrivateKey)  # load_node_private_key checked it
    findings = [Finding("node key", Verdict.OK, f"{path} (fingerprint {public.fingerprint})")]
    mode = loose_mode(path)
    if mode is not None:
        text = f"{path} is readable by other users (mode {mode:04o}); chmod 600 {path}"
        findings.append(Finding("node key", Verdict.WARNING, text))
    return findings, key


# ------------------------------------------------------------------ coordinator


def _coordinator(
    config: NodeConfig,
    node_toml: Path,
    link: _Link | None,
    key: ec.EllipticCurvePrivateKey | None,
) -> list[Finding]:
    """Enrollment, clock and versions, from one answer of the coordinator."""
    if link is None:
        why = "the coordinator could not be asked (see above)"
        return [Finding(check, Verdict.SKIPPED, why) for check in ("enrollment", "clock")]
    import httpx

    headers = signed_headers(key) if key is not None else {}
    try:
        with httpx.Client(verify=link.verify, timeout=CHECK_TIMEOUT_S) as client:
            sent = time.time()
            response = client.get(link.base_url + NODE_CHECK_PATH, headers=headers)
            received = time.time()
        answer = NodeCheckAnswer.model_validate_json(response.content)
    except httpx.HTTPError as exc:
        text = f"cannot ask the coordinator at {config.superlink.address} ({exc})"
        return [Finding("coordinator", Verdict.PROBLEM, text)]
    except ValidationError:
        text = (
            f"the coordinator does not answer consortia's node check (HTTP "
            f"{response.status_code}): it may run an older consortia; enrollment, clock and "
            "versions not checked"
        )
        return [Finding("coordinator", Verdict.WARNING, text)]
    skew = answer.time_utc.timestamp() - (sent + received) / 2  # > 0: this clock is behind
    findings = [_enrollment(config, node_toml, response.status_code, answer, key), _clock(skew)]
    if answer.versions is not None:
        findings.append(_versions(answer))
    return findings


def _enrollment(
    config: NodeConfig,
    node_toml: Path,
    status: int,
    answer: NodeCheckAnswer,
    key: ec.EllipticCurvePrivateKey | None,
) -> Finding:
    if key is None:
        why = "no node key to sign with" if not config.superlink.insecure else "insecure = true"
        return Finding("enrollment", Verdict.SKIPPED, why)
    if answer.enrolled:
        if answer.node != config.name:
            text = (
                f"this key is enrolled as {answer.node!r}, but node.toml names the node "
                f"{config.name!r}; use one name (rename the node, or ask the coordinator's "
                "operator to enroll it under its name)"
            )
            return Finding("enrollment", Verdict.WARNING, text)
        text = f"the coordinator enrolled this key as {answer.node}"
        return Finding("enrollment", Verdict.OK, text)
    if status == 403:
        text = (
            "the coordinator does not accept this node's key (not enrolled, or removed); send the "
            f"public key `consortia node keys show --node {node_toml}` prints to the "
            "coordinator's operator, compare fingerprints, and have them run `consortia "
            f"coordinator nodes add {config.name} KEY`"
        )
        return Finding("enrollment", Verdict.PROBLEM, text)
    text = f"the coordinator refused the signed check: {answer.detail} (see clock)"
    return Finding("enrollment", Verdict.PROBLEM, text)


def _clock(skew: float) -> Finding:
    """`skew`: the coordinator's clock minus this machine's, in seconds."""
    side = "behind" if skew > 0 else "ahead of"
    where = f"{abs(skew):.1f} s {side} the coordinator's"
    fix = "synchronise this machine's clock (NTP: `timedatectl set-ntp true`, or chrony)"
    if skew < -AHEAD_TOLERANCE_S / 2:
        text = (
            f"this clock is {where}; the coordinator refuses a node whose clock runs more than "
            f"{AHEAD_TOLERANCE_S:g} s ahead: {fix}"
        )
        return Finding("clock", Verdict.PROBLEM, text)
    if abs(skew) > CLOCK_WARNING_S:
        return Finding("clock", Verdict.WARNING, f"this clock is {where}; {fix}")
    return Finding("clock", Verdict.OK, f"within {abs(skew):.1f} s of the coordinator's")


def _versions(answer: NodeCheckAnswer) -> Finding:
    assert answer.versions is not None
    mine = installed_versions()
    found = version_mismatches(mine, answer.versions)
    if not found:
        text = f"consortia {mine.consortia}, Flower {mine.flwr}, torch {mine.torch}, as there"
        return Finding("versions", Verdict.OK, text)
    differences = "; ".join(text for _, text in found)
    fix = "install the coordinator's versions (`pip install consortia==… flwr==…`)"
    if any(weight == Mismatch.PROBLEM for weight, _ in found):
        return Finding("versions", Verdict.PROBLEM, f"{differences}: {fix}")
    return Finding("versions", Verdict.WARNING, f"{differences}; results may differ slightly")


# ------------------------------------------------------------------ local state


def _disk(config: NodeConfig) -> list[Finding]:
    folder = config.state_dir
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    findings = []
    if not os.access(folder, os.W_OK):
        text = f"{folder} is not writable by this user; the ledger and audit log are written there"
        findings.append(Finding("disk", Verdict.PROBLEM, f"{text}: fix its owner or mode"))
    where = f"{_size(free)} free for the ledger and audit log ({folder})"
    if free < MIN_FREE_BYTES:
        text = f"only {where}; free space there (the node refuses jobs it cannot record)"
        findings.append(Finding("disk", Verdict.PROBLEM, text))
    elif free < LOW_FREE_BYTES:
        findings.append(Finding("disk", Verdict.WARNING, f"only {where}"))
    else:
        findings.append(Finding("disk", Verdict.OK, where))
    return findings


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _ledger(config: NodeConfig) -> Finding:
    path = ledger_path(config.state_dir)
    if not path.exists():
        return Finding("ledger", Verdict.OK, f"no releases yet ({path} is created by the first)")
    try:
        with PrivacyLedger(path) as ledger:
            datasets = ledger.datasets()
    except LedgerError as exc:
        return Finding("ledger", Verdict.PROBLEM, exc.message)
    return Finding("ledger", Verdict.OK, f"{path} reads: {len(datasets)} dataset(s)")


def _datasets(config: NodeConfig, node_toml: Path) -> list[Finding]:
    from consortia.client.onboarding.registry import DatasetRegistry

    registry = DatasetRegistry(config.state_dir)
    try:
        registered = {registration.name for registration in registry.list()}
    except ConsortiaError as exc:
        return [Finding("datasets", Verdict.PROBLEM, exc.message)]
    if not registered and not config.serve:
        text = (
            "none registered: register the data jobs use with `consortia node data add NAME "
            f"--config dataset.toml --node {node_toml}`"
        )
        return [Finding("datasets", Verdict.WARNING, text)]
    findings = []
    for name in sorted(registered | set(config.serve)):
        check = f"dataset {name}"
        if name not in registered:
            text = (
                f"node.toml serves {name!r}, but no such dataset is registered: `consortia node "
                f"data add {name} --config dataset.toml --node {node_toml}`"
            )
            findings.append(Finding(check, Verdict.PROBLEM, text))
            continue
        try:
            report = registry.check(name)
        except ConsortiaError as exc:
            findings.append(Finding(check, Verdict.PROBLEM, exc.message))
            continue
        served = "" if name in config.serve else " (registered, not served: not in serve)"
        text = f"reads, validates and is unchanged since registration: {report.records} records"
        findings.append(Finding(check, Verdict.OK, text + served))
    return findings


# ------------------------------------------------------------------ GPU


def _gpu(device: Device) -> Finding:
    if device == Device.CPU:
        return Finding("GPU", Verdict.SKIPPED, "jobs train on the CPU (--device cpu)")
    import torch  # here only: the rest of the node never needs it to be checked

    build = f"torch {torch.__version__}"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        try:
            x = torch.ones(64, 64, device="cuda")
            float((x @ x).sum().item())
            torch.cuda.synchronize()
        except RuntimeError as exc:
            text = (
                f"torch sees {name} but cannot compute on it ({exc}); check that the NVIDIA "
                f"driver supports CUDA {torch.version.cuda} ({build})"
            )
            return Finding("GPU", Verdict.PROBLEM, text)
        return Finding("GPU", Verdict.OK, f"{name}, usable by {build} (CUDA {torch.version.cuda})")
    present = Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi") is not None
    if torch.version.cuda is None:
        why = f"{build} is a CPU-only build: install a CUDA build of torch"
    else:
        why = f"{build} finds no CUDA GPU (driver missing, or CUDA_VISIBLE_DEVICES hides it)"
    if device == Device.CUDA or present:
        seen = "an NVIDIA GPU is present, but " if present else ""
        return Finding("GPU", Verdict.PROBLEM, f"{seen}no GPU usable by torch: {why}")
    return Finding("GPU", Verdict.OK, "no GPU on this machine: jobs with device 'auto' use the CPU")
