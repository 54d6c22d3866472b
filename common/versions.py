"""Which consortia, Flower and torch are installed, and whether a node's match its coordinator's.

Read from the installed distributions' metadata, never by importing them:
the coordinator's SuperLink process and a node's supervisor do not load
torch. The coordinator tells an enrolled node its versions when the node
asks (`consortia.common.node_check`); `consortia node doctor` compares them.
"""

from __future__ import annotations

from enum import StrEnum
from importlib import metadata

from pydantic import BaseModel, ConfigDict

from consortia.common.source_revision import source_revision


class SoftwareVersions(BaseModel):
    """Installed versions; None where the package is not installed (or unknown)."""

    model_config = ConfigDict(frozen=True)

    consortia: str | None
    consortia_revision: str | None = None  # `<commit>[-dirty]`, when known
    flwr: str | None
    torch: str | None


def installed_versions() -> SoftwareVersions:
    return SoftwareVersions(
        consortia=_version("consortia"),
        consortia_revision=source_revision(),
        flwr=_version("flwr"),
        torch=_version("torch"),
    )


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


class Mismatch(StrEnum):
    """How much a difference matters."""

    PROBLEM = "problem"  # consortia or Flower: the two sides may not understand each other
    WARNING = "warning"  # torch, or the same consortia version from another revision


def version_mismatches(
    node: SoftwareVersions, coordinator: SoftwareVersions
) -> list[tuple[Mismatch, str]]:
    """Each difference between the node's versions and the coordinator's, with its weight.

    consortia and Flower must match: both ends speak their protocols (the task
    document, the reply keys, SecAgg+, Flower's own messages). torch only
    builds and trains the model on each side, so a different one is a warning.
    """
    found: list[tuple[Mismatch, str]] = []
    for label, mine, theirs, weight in (
        ("consortia", node.consortia, coordinator.consortia, Mismatch.PROBLEM),
        ("Flower", node.flwr, coordinator.flwr, Mismatch.PROBLEM),
        ("torch", node.torch, coordinator.torch, Mismatch.WARNING),
    ):
        if mine != theirs:
            found.append((weight, f"{label} {mine or 'not installed'} here, {theirs} there"))
    revisions = node.consortia_revision, coordinator.consortia_revision
    if not found and None not in revisions and revisions[0] != revisions[1]:
        found.append(
            (
                Mismatch.WARNING,
                f"consortia from revision {revisions[0]} here, {revisions[1]} there",
            )
        )
    return found
