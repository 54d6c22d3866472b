"""report.html: one self-contained page per run, and one per sweep.

A run folder holds JSON for programs; a person wants one file to open, mail
or archive. The page carries everything inline (PNG figures as base64 data,
a few lines of CSS, no script, no external URL), so it renders the same
offline, years later, in any browser.

A run's report is rewritten at the end of the run and after a round when
that is cheap (`RunReport.write_if_cheap`): an interrupted run still has a
report of the rounds it finished.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from consortia.common.atomic import FileAccess, write_bytes_atomic
from consortia.common.membership import PrivacyAudit, read_audit
from consortia.common.protocol import FailureKind
from consortia.server.outputs import html_page as h
from consortia.server.outputs import plots
from consortia.server.outputs.manifest import Manifest
from consortia.server.rounds.run_log import NOT_PRIVATE, NodeFailure, RoundRecord

if TYPE_CHECKING:
    from consortia.server.outputs.metrics_file import MetricsFile

REPORT_FILE = "report.html"

# Rewrite the report after a round only while that costs at most this share of the run's time.
_REPORT_TIME_SHARE = 0.1
_FIRST_COST_GUESS_S = 0.5

# RoundRecord's fields that have their own section; any other field (dropouts,
# adversaries, ... added later) is shown generically under failures.
_ROUND_FIELDS = frozenset(
    {
        "round",
        "accuracy",
        "loss",
        "epsilon",
        "participants",
        "failures",
        "train_loss",
        "seconds",
        "quantization_error",  # a column of "Every round" when secure aggregation ran
        "accuracy_per_node",  # federated evaluation node by node: its own section
        "loss_per_node",
        "accuracy_node_mean",
        "loss_node_mean",
    }
)


# ------------------------------------------------------------------ label mix


class LabelMix(BaseModel):
    """Each node's label distribution, and where the report got it from."""

    source: str
    proportions: dict[str, tuple[float, ...]] = Field(default_factory=dict)
    counts: dict[str, tuple[int, ...]] | None = None
    withheld: dict[str, str] = Field(default_factory=dict)


LabelCounts = Mapping[str, tuple[int, ...]]
"""Every node's true label counts by name: what only a simulation knows (the lab computes them)."""


def run_labels(manifest: Manifest, counts: LabelCounts | None = None) -> LabelMix | None:
    """The true partition in a simulation (`counts`); else the nodes' DP label histograms."""
    return partition_labels(counts) if counts else histogram_labels(manifest)


def partition_labels(counts: LabelCounts) -> LabelMix:
    """Every simulated node's labels (train and test split), as the simulation made them."""
    return LabelMix(
        source="the simulated partition (true counts, train and test split)",
        proportions={name: _shares(c) for name, c in counts.items()},
        counts=dict(counts),
    )


def histogram_labels(manifest: Manifest) -> LabelMix | None:
    """What a deployed coordinator knows: the DP-noised label histograms the nodes shared."""
    skew = manifest.label_skew
    if skew is None:
        return None
    return LabelMix(
        source=f"the nodes' DP label histograms (Gaussian noise, σ = {skew.noise_multiplier:g})",
        proportions={n: v.proportions for n, v in skew.nodes.items() if v.proportions is not None},
        withheld={n: v.withheld or "" for n, v in skew.nodes.items() if v.proportions is None},
    )


def _shares(counts: Sequence[int]) -> tuple[float, ...]:
    total = sum(counts)
    return tuple(c / total if total else 0.0 for c in counts)


# ------------------------------------------------------------------ run report


class RunReport:
    """Renders and writes one run's report.html; keeps what does not change between rounds."""

    def __init__(self, root: Path, label_counts: LabelCounts | None = None) -> None:
        self.path = root / REPORT_FILE
        self.label_counts = label_counts
        self.manifest: Manifest | None = None
        self.labels: LabelMix | None = None
        self._label_png: bytes | None = None
        # Until a first write measures it, assume a report costs about this much: the
        # first one after a round then waits until the run has gone on for a few seconds.
        self._cost_s = _FIRST_COST_GUESS_S
        self._written_at = time.monotonic()

    def set_manifest(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.labels = run_labels(manifest, self.label_counts)
        self._label_png = None

    def write_if_cheap(self, metrics: MetricsFile) -> bool:
        """Write unless the last write was so recent that reports would slow the run down."""
        since = time.monotonic() - self._written_at
        if self._cost_s > _REPORT_TIME_SHARE * (since + self._cost_s):
            return False
        self.write(metrics)
        return True

    def write(self, metrics: MetricsFile) -> Path:
        started = time.monotonic()
        if self.labels is not None and self._label_png is None:
            self._label_png = plots.label_mix_png(self.labels.proportions, "Labels per node")
        page = render_run_report(
            metrics, self.manifest, self.labels, self._label_png, audit_dir=self.path.parent
        )
        write_bytes_atomic(self.path, page.encode("utf-8"), FileAccess.UMASK)
        self._written_at = time.monotonic()
        self._cost_s = self._written_at - started
        return self.path


def render_run_report(
    metrics: MetricsFile,
    manifest: Manifest | None,
    labels: LabelMix | None,
    label_png: bytes | None = None,
    audit_dir: Path | None = None,
) -> str:
    """The whole page as one string (label_png: the label chart, if already rendered;
    audit_dir: the run folder, whose privacy-audit.json, if any, gets a section)."""
    if not _private(metrics, manifest):
        # An older file of a run without DP may hold ε 0.0 per round: no ε is what it means.
        rounds = [r.model_copy(update={"epsilon": None}) for r in metrics.rounds]
        metrics = metrics.model_copy(update={"rounds": rounds})
    rounds = metrics.rounds
    title = manifest.run_name if manifest is not None else "run"
    if labels is not None and label_png is None:
        label_png = plots.label_mix_png(labels.proportions, "Labels per node")
    sections = [
        _run_summary(metrics, manifest),
        h.section(
            "Accuracy and loss per round",
            h.figure(plots.accuracy_loss_png(rounds), "accuracy and loss per round")
            if rounds
            else h.note("No round has finished yet."),
        ),
        _node_evaluation_section(rounds),
        _epsilon_section(metrics, manifest),
        _labels_section(labels, label_png),
        _failures_section(rounds),
        _audit_section(read_audit(audit_dir)) if audit_dir is not None else "",
        _manifest_section(manifest),
        _rounds_section(rounds),
    ]
    return h.page(f"Consortia run {title}", sections)


def _run_summary(metrics: MetricsFile, manifest: Manifest | None) -> str:
    planned = manifest.config.get("rounds") if manifest is not None else None
    done = len(metrics.rounds)
    if metrics.final is not None:
        status = f"finished: {done} rounds"
    else:
        status = f"not finished (running or interrupted): {done} of {planned or '?'} rounds"
    rows = [("status", status)]
    final = metrics.final
    last = metrics.rounds[-1] if metrics.rounds else None
    accuracy = final.accuracy if final is not None else last.accuracy if last else None
    rows.append(("accuracy", h.number(accuracy)))
    if last is not None and last.accuracy_node_mean is not None:
        rows.append(("accuracy, unweighted mean over nodes", h.number(last.accuracy_node_mean)))
    delta = _delta(manifest)
    if not _private(metrics, manifest):
        rows.append(("max ε per node", f"{NOT_PRIVATE} (trained without DP: no finite ε)"))
    else:
        epsilon = last.epsilon_max if last is not None else None
        at = f" at δ = {delta:g}" if delta is not None else ""
        rows.append(("max ε per node", h.number(epsilon) + at))
    if manifest is not None:
        rows.append(("scenario", manifest.scenario_source))
        rows.append(("started (UTC)", manifest.created_utc))
    rows.append(("report written (UTC)", h.utc_now()))
    return h.section("Summary", h.key_values(rows))


def _epsilon_section(metrics: MetricsFile, manifest: Manifest | None) -> str:
    rounds = metrics.rounds
    if not rounds:
        return h.section("Privacy spent (ε) per node", h.note("No round has finished yet."))
    delta = _delta(manifest)
    last = rounds[-1].epsilon
    if last is None:
        return h.section(
            "Privacy spent (ε) per node",
            h.note(
                f"{NOT_PRIVATE.capitalize()}: the nodes trained without differential privacy, "
                "so no ε bounds what the models reveal about any record (ε is not 0, it does "
                "not exist)."
            ),
        )
    table = h.table(
        ["node", f"ε after round {rounds[-1].round}"],
        [[name, f"{value:.4f}"] for name, value in sorted(last.items())],
    )
    note = (
        h.note("Training without differential privacy: ε is not bounded.")
        if delta is None
        else h.note(
            f"ε so far under DP-SGD at δ = {delta:g}; a node keeps its ε in rounds it sits out."
        )
    )
    body = h.figure(plots.epsilon_png(rounds, delta), "ε per node per round") + note
    body += h.folded(table, len(last), "nodes")
    return h.section("Privacy spent (ε) per node", body)


def _node_evaluation_section(rounds: list[RoundRecord]) -> str:
    """Federated evaluation node by node: every site's own figures, beside the pooled one."""
    evaluated = [r for r in rounds if r.accuracy_per_node or r.loss_per_node]
    if not evaluated:
        return ""  # centralized or no evaluation: there is no per-node figure
    last = evaluated[-1]
    names = sorted({*last.accuracy_per_node, *last.loss_per_node})
    rows = [
        [name, h.number(last.accuracy_per_node.get(name)), h.number(last.loss_per_node.get(name))]
        for name in names
    ]
    rows.append(
        [
            "unweighted mean over nodes",
            h.number(last.accuracy_node_mean),
            h.number(last.loss_node_mean),
        ]
    )
    rows.append(["pooled (weighted by test records)", h.number(last.accuracy), h.number(last.loss)])
    body = h.note(
        f"Each node's accuracy and loss on its own test split in round {last.round}; the "
        "unweighted mean counts every node once, the pooled figure counts every test record "
        "once (large sites weigh more). metrics.json has them for every round."
    )
    table = h.table(["node", "accuracy", "loss"], rows)
    return h.section("Evaluation per node", body + h.folded(table, len(rows), "nodes"))


def _labels_section(labels: LabelMix | None, label_png: bytes | None) -> str:
    title = "Label distribution per node"
    if labels is None:
        return h.section(
            title,
            h.note(
                "Not known: a deployed coordinator sees no labels unless the job asks the nodes "
                "for DP label histograms ([label_histogram])."
            ),
        )
    body = h.note(f"From {labels.source}.")
    if label_png is not None and labels.proportions:
        body += h.figure(label_png, "label distribution per node")
    classes = max((len(v) for v in labels.proportions.values()), default=0)
    source = labels.counts if labels.counts is not None else labels.proportions
    cells: Callable[[float], str] = (
        (lambda v: str(v)) if labels.counts is not None else (lambda v: f"{v:.3f}")
    )
    rows = [[name, *(cells(v) for v in values)] for name, values in source.items()]
    rows += [[name, f"withheld: {reason}"] for name, reason in labels.withheld.items()]
    table = h.table(["node", *(f"class {c}" for c in range(classes))], rows)
    return h.section(title, body + h.folded(table, len(rows), "nodes"))


def _audit_section(audit: PrivacyAudit | None) -> str:
    """`consortia audit privacy`'s figures; no section until an audit was made."""
    if audit is None:
        return ""
    claimed = "no DP" if audit.claimed_epsilon is None else f"{audit.claimed_epsilon:.4g}"
    members = audit.attacks[0].members if audit.attacks else 0
    body = h.note(
        f"Membership-inference attacks on round {audit.round}'s model: {members} of the "
        f"nodes' training records against {members} records they held out. Claimed ε: "
        f"{claimed} at δ = {audit.delta:g}. An ε lower bound above the claim would mean the "
        "accounting is wrong (docs/privacy-audit.md)."
    )

    def rate(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    rows = [
        [
            a.attack,
            f"{a.auc:.3f}",
            rate(a.tpr_at_fpr_0_1pct),
            rate(a.tpr_at_fpr_1pct),
            f"{a.epsilon_lower_bound:.3f}",
        ]
        for a in audit.attacks
    ]
    headers = ["attack", "AUC", "TPR at 0.1% FPR", "TPR at 1% FPR", "ε lower bound (95%)"]
    return h.section("Privacy audit (membership inference)", body + h.table(headers, rows))


# What the report calls each kind of failure.
_KIND_LABELS = {
    FailureKind.REFUSED: "refused",
    FailureKind.ERROR_REPLY: "node error",
    FailureKind.NO_REPLY: "no reply (dropout)",
    FailureKind.MALFORMED: "malformed reply",
    FailureKind.SCREENED_OUT: "rejected update",
    FailureKind.KRUM_EXCLUDED: "not selected",
    FailureKind.MULTIKRUM_EXCLUDED: "not selected",
    FailureKind.SECAGG_DROPOUT: "left secure aggregation",
    # Only the simulation lab's virtual nodes report these faults.
    FailureKind.DROPOUT: "simulated dropout",
    FailureKind.LATE: "simulated straggler",
    FailureKind.CRASH: "simulated crash",
}


def failure_kind(failure: NodeFailure) -> str:
    """The failure's kind, as the report names it."""
    return _KIND_LABELS[failure.kind]


def _failures_section(rounds: list[RoundRecord]) -> str:
    title = "Failures, dropouts and rejected updates"
    extras = _extra_fields(rounds)
    fields = _failure_fields(rounds)
    rows = [
        [
            str(r.round),
            f.node,
            failure_kind(f),
            *(h.short_text(dump.get(k)) for k in fields),
            f.reason,
        ]
        for r in rounds
        for f, dump in ((f, f.model_dump()) for f in r.failures)
    ]
    extra_rows = [
        [str(r.round), key, h.short_text(value)]
        for r in rounds
        for key, value in _extras_of(r, extras)
    ]
    if not rows and not extra_rows:
        return h.section(
            title, h.note("None: every node asked answered, and every update was used.")
        )
    chart = plots.counts_png(
        _failure_counts(rounds, extras), [r.round for r in rounds], "Failures per round"
    )
    body = h.figure(chart, "failures per round")
    if rows:
        body += h.table(["round", "node", "kind", *fields, "reason"], rows)
    if extra_rows:
        body += h.table(["round", "field", "value"], extra_rows)
    return h.section(title, body)


def _failure_fields(rounds: list[RoundRecord]) -> list[str]:
    """NodeFailure's fields besides node, kind and reason (refusal, and any added later)."""
    shown = {"node", "kind", "reason"}  # columns of their own
    known = [k for k in NodeFailure.model_fields if k not in shown]
    found = {k for r in rounds for f in r.failures for k in f.model_dump()}
    return known + sorted(found - {*shown, *known})


def _failure_counts(rounds: list[RoundRecord], extras: list[str]) -> dict[str, list[int]]:
    """Per category, its count in each round; extra list/number fields count as their own."""
    kinds = sorted({failure_kind(f) for r in rounds for f in r.failures})
    series = {
        kind: [sum(failure_kind(f) == kind for f in r.failures) for r in rounds] for kind in kinds
    }
    for key in extras:
        counts = [_count(getattr(r, key, None)) for r in rounds]
        if all(c is not None for c in counts) and any(counts):
            series[key.replace("_", " ")] = [c or 0 for c in counts]
    return series


def _extra_fields(rounds: list[RoundRecord]) -> list[str]:
    """RoundRecord fields beyond the ones this report knows, that some round fills in."""
    found: set[str] = set()
    for record in rounds:
        found |= {k for k, v in record.model_dump().items() if k not in _ROUND_FIELDS and v}
    return sorted(found)


def _extras_of(record: RoundRecord, extras: list[str]) -> list[tuple[str, Any]]:
    dumped = record.model_dump()
    return [(key, dumped[key]) for key in extras if dumped.get(key)]


def _count(value: Any) -> int | None:
    """How many nodes a field names: a list's length, a {kind: [nodes]} map's total.
    None for anything else (a {node: share} map is a measure, not a count of nodes)."""
    if value is None:
        return 0
    if isinstance(value, list | tuple | set):
        return len(value)
    if isinstance(value, dict) and all(isinstance(v, list | tuple) for v in value.values()):
        return sum(len(v) for v in value.values())
    return None


def _manifest_section(manifest: Manifest | None) -> str:
    title = "Manifest"
    if manifest is None:
        return h.section(title, h.note("manifest.json has not been written yet."))
    packages = manifest.packages
    rows = [
        ("run", manifest.run_name),
        ("scenario / job", manifest.scenario_source),
        ("source sha256", manifest.scenario_source_sha256),
        ("config sha256", manifest.config_sha256),
        ("seed", str(manifest.seed)),
        ("created (UTC)", manifest.created_utc),
        ("consortia", packages.get("consortia", "?")),
        ("git commit", manifest.git_commit or "unknown: not built from a git checkout"),
        ("packages", ", ".join(f"{k} {v}" for k, v in packages.items() if k != "consortia")),
        ("python", manifest.python),
        ("model architecture", manifest.model_architecture),
    ]
    fingerprints = h.table(
        ["node", "data fingerprint (sha256)"],
        [[name, h.code(value)] for name, value in sorted(manifest.data_fingerprints.items())],
        raw=True,
    )
    fingerprints = h.folded(fingerprints, len(manifest.data_fingerprints), "nodes")
    return h.section(title, h.key_values(rows) + "<h3>Data fingerprints</h3>" + fingerprints)


def _rounds_section(rounds: list[RoundRecord]) -> str:
    """One row a round; secure-aggregation runs add the fixed-point error of each mean."""
    secure = any(r.quantization_error is not None for r in rounds)
    per_node = any(r.accuracy_node_mean is not None for r in rounds)
    rows = [
        [
            str(r.round),
            h.number(r.accuracy),
            *([h.number(r.accuracy_node_mean)] if per_node else []),
            h.number(r.loss),
            h.number(r.train_loss),
            NOT_PRIVATE if r.epsilon is None else h.number(max(r.epsilon.values(), default=None)),
            str(len(r.participants)),
            str(len(r.failures)),
            h.number(r.seconds, "{:.2f}"),
            *([h.number(r.quantization_error, "{:.2g}")] if secure else []),
        ]
        for r in rounds
    ]
    headers = ["round", "accuracy", *(["node mean accuracy"] if per_node else [])]
    headers += ["loss", "train loss", "max ε", "used", "failures", "seconds"]
    if secure:
        headers.append("secure-aggregation error")
    body = f"<details><summary>{len(rounds)} rounds</summary>{h.table(headers, rows)}</details>"
    return h.section("Every round", body)


def _private(metrics: MetricsFile, manifest: Manifest | None) -> bool:
    """Whether the run trains with DP: its final block says, else its manifest, else its rounds."""
    if metrics.final is not None:
        return metrics.final.private
    if manifest is not None:
        return manifest.private
    return all(r.epsilon is not None for r in metrics.rounds)


def _delta(manifest: Manifest | None) -> float | None:
    """The run's δ, or None when it trains without DP (or the manifest is not there yet)."""
    privacy = manifest.config.get("privacy") if manifest is not None else None
    if not isinstance(privacy, dict) or not privacy.get("enabled", True):
        return None
    delta = privacy.get("delta")
    return float(delta) if isinstance(delta, int | float) else None
