"""A node's data onboarding: register a local dataset, validate it, report on its quality.

A hospital's IT team describes a dataset in a `dataset.toml` (see
`example-dataset.toml` beside this file), registers it under a name, and gets
a quality report; at training time the node loads it, after checking that
the data has not changed since registration.

Modules: `schema` (the dataset.toml models), `readers` (raw cells and
arrays), `validation` (typed columns, every problem), `prepare` (train/test
arrays), `fingerprint` (content fingerprints), `quality` (the report),
`registry` (the node's registered datasets), `problems` (problem lists);
for DICOM sources `dicom_reader` (files and label file into records),
`dicom_pixels` (frames onto [0, 1]) and `dicom_summary` (their counts).
"""

from consortia.client.onboarding.fingerprint import (
    check_unchanged,
    fingerprint,
    inspection_fingerprint,
)
from consortia.client.onboarding.prepare import PreparedDataset, prepare
from consortia.client.onboarding.problems import Problem, ProblemLog
from consortia.client.onboarding.quality import QualityReport, quality_report
from consortia.client.onboarding.registry import DatasetRegistry, Registration, check_name
from consortia.client.onboarding.schema import (
    ColumnSpec,
    CsvSource,
    DatasetSpec,
    DicomSource,
    IdxSource,
    ImageFolderSource,
    NpzSource,
    ParquetSource,
    SplitSpec,
    load_spec,
)
from consortia.client.onboarding.validation import Inspection, inspect, validate

__all__ = [
    "ColumnSpec",
    "CsvSource",
    "DatasetRegistry",
    "DatasetSpec",
    "DicomSource",
    "IdxSource",
    "ImageFolderSource",
    "Inspection",
    "NpzSource",
    "ParquetSource",
    "PreparedDataset",
    "Problem",
    "ProblemLog",
    "QualityReport",
    "Registration",
    "SplitSpec",
    "check_name",
    "check_unchanged",
    "fingerprint",
    "inspect",
    "inspection_fingerprint",
    "load_spec",
    "prepare",
    "quality_report",
    "validate",
]
