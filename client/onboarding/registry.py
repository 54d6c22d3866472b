"""The node's registry of local datasets, kept in its state folder.

Layout, one folder per dataset::

    <state_dir>/datasets/<name>/
        registration.json   name, registered-at (UTC), the validated schema with
                            absolute paths, the content fingerprint, sizes, and
                            the feature scaling (kind; image constants used)
        spec.toml           the schema file exactly as it was given
        quality.json        the quality report (stays on the node)

A registration is written into a hidden staging folder and renamed into
place, so a crash never leaves half a registration; a dataset that fails
validation leaves nothing behind. The stored schema, not the original TOML
file, is what later checks and loads use: editing or moving the TOML file
after registration changes nothing until the dataset is registered again.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from consortia.client.onboarding.fingerprint import check_unchanged, inspection_fingerprint
from consortia.client.onboarding.prepare import PreparedDataset, prepare
from consortia.client.onboarding.quality import QualityReport
from consortia.client.onboarding.schema import DatasetSpec, load_spec
from consortia.client.onboarding.validation import CHECK_FAILED, Inspection, inspect
from consortia.common.atomic import fsync_dir, write_bytes_atomic, write_json_atomic
from consortia.common.audit import AuditError, AuditLog
from consortia.common.errors import ConfigError, DataError
from consortia.common.scaling import FeatureScaling

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
REGISTRATION_FILE = "registration.json"
SPEC_FILE = "spec.toml"
QUALITY_FILE = "quality.json"


class Registration(BaseModel):
    """What the registry knows about one dataset."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    registered_at: datetime
    spec_file: str
    spec: DatasetSpec
    fingerprint: str
    records: int
    train_records: int
    test_records: int
    num_classes: int
    feature_names: tuple[str, ...]
    feature_shape: tuple[int, ...]
    # How the features are scaled (None: registered before it was recorded).
    scaling: FeatureScaling | None = None


def check_name(name: str) -> str:
    """Return `name` if it is a valid dataset name, else raise `DataError`."""
    if not NAME_PATTERN.fullmatch(name):
        raise DataError(
            f"{name!r} is not a valid dataset name: use 1 to 64 lowercase letters, digits, "
            "'-' or '_', starting with a letter or digit (e.g. 'cardio-2024')"
        )
    return name


class DatasetRegistry:
    """Registered datasets of one node, under `state_dir/datasets/`.

    With `audit` (a deployed node's log, `client/node_audit.py`), every
    registration is recorded there as `data.registered`.
    """

    def __init__(self, state_dir: Path, audit: AuditLog | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.root = self.state_dir / "datasets"
        self.audit = audit

    def path(self, name: str) -> Path:
        """The folder of dataset `name` (whether or not it exists)."""
        return self.root / check_name(name)

    # ------------------------------------------------------------------ write

    def add(self, name: str, spec_path: Path, *, replace: bool = False) -> Registration:
        """Validate the dataset `spec_path` describes and register it as `name`.

        Raises `ConfigError` for a bad schema file and `DataError` for bad data
        (listing every problem), an invalid name, or a name already taken
        (unless `replace`); in every such case nothing is written.
        """
        target = self.path(name)
        spec_path = Path(spec_path)
        spec = load_spec(spec_path)
        try:
            spec_text = spec_path.read_bytes()
        except OSError as exc:  # pragma: no cover - load_spec has just read it
            raise ConfigError(f"{spec_path}: cannot be read ({exc})") from None
        if target.exists() and not replace:
            raise DataError(
                f"dataset '{name}' is already registered ({target}); choose another name, or "
                f"replace it: `consortia node data add {name} --config {spec_path} --replace`"
            )
        try:
            inspection = inspect(spec)
            inspection.raise_if_problems(CHECK_FAILED)
            prepared = prepare(spec, inspection)
        except DataError as exc:
            raise DataError(f"dataset '{name}' was not registered; {exc.message}") from None
        registration = Registration(
            name=name,
            registered_at=datetime.now(UTC),
            spec_file=str(spec_path.resolve()),
            spec=spec,
            fingerprint=inspection_fingerprint(inspection),
            records=int(inspection.records.keep.sum()),
            train_records=len(prepared.train),
            test_records=len(prepared.test),
            num_classes=prepared.num_classes,
            feature_names=prepared.feature_names,
            feature_shape=prepared.feature_shape,
            scaling=spec.feature_scaling(),
        )
        self._refuse_duplicate_content(registration)
        report = QualityReport.from_inspection(inspection, dataset=name)
        replaced = target.exists()
        self._write(target, registration, report, spec_text, replace=replace)
        self._audit_registration(registration, replaced)
        return registration

    def _audit_registration(self, registration: Registration, replaced: bool) -> None:
        """After the registration is in place: the log records what happened, not an intent."""
        if self.audit is None:
            return
        try:
            self.audit.append(
                "data.registered",
                dataset=registration.name,
                fingerprint=registration.fingerprint,
                records=registration.records,
                train_records=registration.train_records,
                test_records=registration.test_records,
                num_classes=registration.num_classes,
                replaced=replaced,
            )
        except AuditError as exc:
            raise AuditError(
                f"dataset '{registration.name}' was registered, but the audit log could not "
                f"record it: {exc.message}"
            ) from None

    def _refuse_duplicate_content(self, registration: Registration) -> None:
        """The same records under a second name would get a second, fresh privacy budget."""
        for other in self.list():
            if other.name != registration.name and other.fingerprint == registration.fingerprint:
                raise DataError(
                    f"dataset '{registration.name}' was not registered: its content is identical "
                    f"to the registered dataset '{other.name}' (fingerprint "
                    f"{other.fingerprint[:16]}…), and the privacy ledger keeps one budget per "
                    f"dataset name; serve '{other.name}' instead"
                )

    def _write(
        self,
        target: Path,
        registration: Registration,
        report: QualityReport,
        spec_text: bytes,
        *,
        replace: bool,
    ) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=self.root))
        try:
            write_bytes_atomic(staging / SPEC_FILE, spec_text)
            write_json_atomic(staging / REGISTRATION_FILE, registration.model_dump(mode="json"))
            report.write_report(staging / QUALITY_FILE)
            if replace and target.exists():
                retired = self.root / f".{target.name}.{uuid.uuid4().hex}.old"
                target.rename(retired)
                staging.rename(target)
                shutil.rmtree(retired, ignore_errors=True)
            else:
                try:
                    staging.rename(target)
                except OSError:
                    raise DataError(
                        f"dataset '{target.name}' was registered by someone else meanwhile "
                        f"({target}); check it, or register again with replace"
                    ) from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_dir(self.root)

    # ------------------------------------------------------------------- read

    def get(self, name: str) -> Registration:
        """The registration of `name`; `DataError` if there is none."""
        file = self.path(name) / REGISTRATION_FILE
        if not file.is_file():
            known = [r.name for r in self.list()]
            listing = f"registered: {', '.join(known)}" if known else "none is registered"
            raise DataError(
                f"no dataset named '{name}' in {self.root} ({listing}); register it with "
                f"`consortia node data add {name} --config dataset.toml`"
            )
        try:
            return Registration.model_validate_json(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            first = str(exc).splitlines()[0]
            raise DataError(
                f"{file}: the registration is damaged ({first}); register the dataset again "
                "with replace"
            ) from None

    def list(self) -> list[Registration]:
        """Every registered dataset, by name."""
        if not self.root.is_dir():
            return []
        names = sorted(
            p.name
            for p in self.root.iterdir()
            if NAME_PATTERN.fullmatch(p.name) and (p / REGISTRATION_FILE).is_file()
        )
        return [self.get(name) for name in names]

    def quality(self, name: str) -> QualityReport:
        """The quality report written at registration."""
        return QualityReport.read(self.path(name) / QUALITY_FILE)

    # ------------------------------------------------------------------ check

    def check(self, name: str) -> QualityReport:
        """Re-validate `name` and compare its content with the registered fingerprint.

        Raises `DataError` if the data changed since registration (saying how
        to accept the change) or no longer validates; returns a fresh quality
        report (not written: the registered one stays as it was).
        """
        registration = self.get(name)
        inspection = check_unchanged(registration.fingerprint, registration.spec, name=name)
        inspection.raise_if_problems(f"dataset '{name}': {CHECK_FAILED}")
        prepare(registration.spec, inspection)
        return QualityReport.from_inspection(inspection, dataset=name)

    def load(self, name: str) -> PreparedDataset:
        """The prepared train/test data of `name`, after checking it is unchanged."""
        return self.load_inspected(name)[0]

    def load_inspected(self, name: str) -> tuple[PreparedDataset, Inspection]:
        """`load`, and the inspection it was prepared from (per-record columns, missing values)."""
        registration = self.get(name)
        inspection = check_unchanged(registration.fingerprint, registration.spec, name=name)
        return prepare(registration.spec, inspection), inspection

    def spec(self, name: str) -> DatasetSpec:
        """The validated schema stored at registration (absolute paths)."""
        return self.get(name).spec
