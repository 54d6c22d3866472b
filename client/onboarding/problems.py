"""Problems found in a dataset, collected so that one error lists all of them.

Each problem names the file, the 1-based row as in the file (the header line
counts when there is one; Parquet and array sources count records from 1),
the column, the bad value and how to fix it. A check that finds the same kind
of problem many times keeps only its first few examples and a count, so a
million-row file with one broken column stays cheap to report.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from consortia.common.errors import DataError

MAX_SHOWN = 20


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the data, with where it is and what to do about it."""

    file: str
    message: str
    row: int | None = None
    column: str | None = None
    value: str | None = None
    # Position of the column in the schema: orders problems of one row.
    column_index: int = field(default=-1, compare=False, repr=False)

    def __str__(self) -> str:
        where = [self.file]
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.column is not None:
            where.append(f"column '{self.column}'")
        head = where[0] + (": " + ", ".join(where[1:]) if len(where) > 1 else "")
        return f"{head}: {self.message}"

    def sort_key(self) -> tuple[int, int, int]:
        return (self.row is not None, self.row or 0, self.column_index)


class ProblemLog:
    """Collects problems by kind: every one is counted, the first few are kept."""

    def __init__(self) -> None:
        self._examples: dict[str, list[Problem]] = {}
        self._counts: dict[str, int] = {}

    def add(self, problem: Problem, kind: str | None = None) -> None:
        """Record one problem; `kind` groups problems of one check (default: its message)."""
        key = kind if kind is not None else f"{problem.column}\0{problem.message}"
        self._counts[key] = self._counts.get(key, 0) + 1
        examples = self._examples.setdefault(key, [])
        if len(examples) < MAX_SHOWN:
            examples.append(problem)

    def add_batch(self, kind: str, examples: Iterable[Problem], total: int) -> None:
        """Record `total` problems of one kind of which `examples` are the first ones."""
        if total <= 0:
            return
        self._counts[kind] = self._counts.get(kind, 0) + total
        kept = self._examples.setdefault(kind, [])
        for problem in examples:
            if len(kept) >= MAX_SHOWN:
                break
            kept.append(problem)

    def extend(self, other: ProblemLog) -> None:
        for kind, count in other._counts.items():
            self.add_batch(kind, other._examples.get(kind, []), count)

    def __len__(self) -> int:
        return sum(self._counts.values())

    def __bool__(self) -> bool:
        return len(self) > 0

    def counts(self) -> dict[str, int]:
        """Problems per kind."""
        return dict(self._counts)

    def shown(self, limit: int = MAX_SHOWN) -> list[Problem]:
        """The first `limit` problems, file-level ones first, then by row and column."""
        every = [p for examples in self._examples.values() for p in examples]
        return sorted(every, key=Problem.sort_key)[:limit]

    def message(self, header: str, limit: int = MAX_SHOWN) -> str:
        """`header: N problems` then one line per shown problem and "... and N more"."""
        total = len(self)
        lines = [f"{header}: {total} problem{'' if total == 1 else 's'}"]
        shown = self.shown(limit)
        lines += [f"  - {problem}" for problem in shown]
        if total > len(shown):
            lines.append(f"  ... and {total - len(shown)} more (fix these and check again)")
        return "\n".join(lines)

    def raise_if_any(self, header: str) -> None:
        """Raise one `DataError` listing the problems, if there are any."""
        if self:
            raise DataError(self.message(header))


def fail(problem: Problem) -> DataError:
    """A `DataError` for a problem that stops reading (missing file, empty file...)."""
    return DataError(str(problem))
