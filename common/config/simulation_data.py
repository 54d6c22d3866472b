"""`[simulation.data]` and `[simulation.partition]`: the simulated consortium's data.

Where the data comes from (a bundled set, IDX files, or one file per node)
and how one dataset is split across the nodes (the split itself is
`consortia.common.partition`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from consortia.common.config.scaling import ImageNormalization
from consortia.common.config.strict import StrictModel

# Data sources that ship with scikit-learn: nothing to point at, so no `path`.
BUNDLED_SOURCES = ("breast_cancer", "digits")
DEFAULT_TEST_FRACTION = 0.2


class DataConfig(StrictModel):
    """Where the simulated consortium's data comes from.

    - 'breast_cancer', 'digits': scikit-learn's bundled sets;
    - 'idx': an MNIST-style folder of IDX files at `path` (its t10k files, when
      present, are the coordinator's centralized test set);
    - 'files': one CSV or Parquet file per node (`files`, in node order), read
      with the node onboarding's schema (`schema_file`, a dataset.toml): a
      *natural* partition, as a real consortium has it, so no
      `[simulation.partition]` applies and each node's train/test split is the
      schema's `[split]`.

    `path` may stay unset in the file for 'idx' and 'files' (`consortia
    simulate --data PATH` fills it): a scenario can ship without the location
    of data that lives elsewhere on every machine. For 'files' it is the
    folder the files are read from (default: the scenario file's folder).
    Relative paths in a scenario file are resolved from the file's folder.
    """

    source: Literal["breast_cancer", "digits", "idx", "files"] = "breast_cancer"
    path: str | None = Field(
        default=None,
        description="'idx': the folder with the IDX files; 'files': the folder holding `files`",
    )
    files: tuple[str, ...] | None = Field(
        default=None, description="'files': one CSV or Parquet file per node, in node order"
    )
    schema_file: str | None = Field(
        default=None, description="'files': the dataset.toml (node onboarding schema) they follow"
    )
    test_fraction: float = Field(default=DEFAULT_TEST_FRACTION, gt=0, lt=1)
    max_records: int | None = Field(
        default=None,
        ge=1,
        description="partition a seeded random subset of this many pool records (faster runs)",
    )
    normalize: ImageNormalization | None = Field(
        default=None,
        description="'idx': public mean and std of the pixels on [0, 1]; unset, the pixels "
        "are used on their fixed [0, 1] scale",
    )

    @model_validator(mode="after")
    def _keys_fit_source(self) -> DataConfig:
        where = f"source = '{self.source}'"
        if self.normalize is not None and self.source != "idx":
            raise ValueError(
                f"{where} takes no [simulation.data.normalize] (public pixel constants for "
                "source = 'idx'); remove it"
            )
        if self.normalize is not None:
            try:
                self.normalize.per_channel(1)
            except ValueError as exc:
                raise ValueError(
                    f"[simulation.data.normalize]: IDX images are grayscale; {exc}"
                ) from None
        if self.source in BUNDLED_SOURCES and self.path is not None:
            raise ValueError(
                f"{where} is bundled with scikit-learn and takes no 'path' "
                "('path' is for the 'idx' and 'files' sources); remove it"
            )
        if self.source != "files":
            extra = [key for key in ("files", "schema_file") if getattr(self, key) is not None]
            if extra:
                raise ValueError(
                    f"{where} takes no {' or '.join(repr(k) for k in extra)} "
                    "(they are for source = 'files'); remove them"
                )
            return self
        if not self.files:
            raise ValueError(f"{where} needs 'files': one CSV or Parquet file per node")
        if len(set(self.files)) != len(self.files):
            raise ValueError("'files' lists a file twice: every node needs its own file")
        if self.schema_file is None:
            raise ValueError(
                f"{where} needs 'schema_file': the dataset.toml (columns, label, split) "
                "every node's file follows, as in `consortia node data add`"
            )
        if self.test_fraction != DEFAULT_TEST_FRACTION:
            raise ValueError(
                f"{where} splits each node's file with the schema's [split]; "
                "remove 'test_fraction' (set [split] test_fraction in the schema file)"
            )
        if self.max_records is not None:
            raise ValueError(f"{where} uses each node's whole file; remove 'max_records'")
        return self


PartitionMethod = Literal["iid", "dirichlet", "pathological", "quantity", "column"]

DEFAULT_ALPHA = 0.5
_OPTIONAL_PARTITION_KEYS = ("alpha", "classes_per_node", "column", "column_values")

# The keys each partition method reads (besides 'method' and 'min_records').
# 'alpha' is tolerated with 'iid' (ignored): scenarios and tests written before
# this check switch between 'dirichlet' and 'iid' without removing it.
_PARTITION_KEYS: dict[str, frozenset[str]] = {
    "iid": frozenset({"alpha"}),
    "dirichlet": frozenset({"alpha"}),
    "pathological": frozenset({"classes_per_node"}),
    "quantity": frozenset({"alpha"}),
    "column": frozenset({"column", "column_values"}),
}


class PartitionConfig(StrictModel):
    """How one dataset is split across the simulated nodes (see common/partition.py).

    - 'iid': a seeded shuffle cut into equal parts;
    - 'dirichlet': label skew, each class shared by proportions ~ Dirichlet(`alpha`);
    - 'pathological': each node holds exactly `classes_per_node` classes
      (the shard scheme of McMahan et al., 2017);
    - 'quantity': quantity skew, node sizes ∝ Dirichlet(`alpha`), labels IID;
    - 'column': the value of the feature `column` decides the node (tabular
      sources): values round-robin in sorted order, or `column_values[i]`
      lists the values of node i.

    A key that the chosen method does not read is an error, not ignored.
    """

    method: PartitionMethod = "dirichlet"
    alpha: float | None = Field(
        default=None,
        gt=0,
        description=f"Dirichlet concentration ('dirichlet', 'quantity'; default {DEFAULT_ALPHA})",
    )
    min_records: int = Field(default=10, ge=1, description="fewest records a node may get")
    classes_per_node: int | None = Field(
        default=None, ge=1, description="'pathological': classes each node holds"
    )
    column: str | None = Field(
        default=None, min_length=1, description="'column': the feature whose value picks the node"
    )
    column_values: tuple[tuple[float | int | str, ...], ...] | None = Field(
        default=None, description="'column': the column values of each node, in node order"
    )

    @model_validator(mode="after")
    def _keys_fit_method(self) -> PartitionConfig:
        given = [key for key in _OPTIONAL_PARTITION_KEYS if getattr(self, key) is not None]
        unused = [key for key in given if key not in _PARTITION_KEYS[self.method]]
        if unused:
            raise ValueError(
                f"method = '{self.method}' does not use {', '.join(repr(k) for k in unused)}; "
                "remove it or choose the method that reads it"
            )
        if self.method == "pathological" and self.classes_per_node is None:
            raise ValueError(
                "method = 'pathological' needs 'classes_per_node' (the classes each node holds)"
            )
        if self.method == "column" and self.column is None:
            raise ValueError(
                "method = 'column' needs 'column' (the feature whose value picks the node)"
            )
        if self.column_values is not None:
            empty = [i for i, values in enumerate(self.column_values) if not values]
            if empty:
                raise ValueError(
                    f"'column_values[{empty[0]}]' is empty; every node needs at least one value"
                )
            flat = [v for values in self.column_values for v in values]
            if len(set(flat)) != len(flat):
                raise ValueError("'column_values' lists a value for two nodes (or twice)")
        return self

    @property
    def concentration(self) -> float:
        """The Dirichlet concentration in effect ('dirichlet', 'quantity')."""
        return DEFAULT_ALPHA if self.alpha is None else self.alpha
