"""Reading a Prometheus endpoint as Prometheus does: shared by the metrics tests."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


def scrape(url: str) -> dict[str, list[Sample]]:
    """Samples by metric family name, parsed as Prometheus parses the exposition."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return families(text)


def families(text: str) -> dict[str, list[Sample]]:
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def value(samples: Iterable[Sample], name: str, **labels: str) -> float | None:
    """The value of the sample `name` whose labels include `labels`, None if there is none."""
    for sample in samples:
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
            return float(sample.value)
    return None


def non_loopback_address() -> str | None:
    """An IPv4 address of this machine that is not loopback, if it has one (no packet sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: picks the outgoing interface only
            address = str(probe.getsockname()[0])
        except OSError:
            return None
    return None if address.startswith("127.") else address


def assert_refused_from_outside(port: int) -> None:
    """Bound to 127.0.0.1: no other address of this machine reaches the port."""
    address = non_loopback_address()
    if address is not None:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((address, port), timeout=5).close()
    listening = Path("/proc/net/tcp").read_text().splitlines()[1:]
    local = {line.split()[1] for line in listening if line.split()[3] == "0A"}  # LISTEN
    assert f"0100007F:{port:04X}" in local  # 127.0.0.1, little-endian hex
    assert f"00000000:{port:04X}" not in local  # not 0.0.0.0


def sample(served: dict[str, list[Sample]], name: str, **labels: str) -> float | None:
    """The value of the sample `name` (with `labels`) in a scrape, whichever family holds it."""
    return value((s for samples in served.values() for s in samples), name, **labels)
