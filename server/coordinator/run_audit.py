"""A coordinator run's entries in the coordinator's audit log.

Wraps the run's progress listener: the run starting (with its config hash
and nodes), every aggregated round (participants, accuracy, ε per node),
every update the coordinator rejected and every refusal a node sent, each
with its reason, and the run's end. A resumed run replays its checkpointed
rounds to the listener; those are on record already and are not repeated.
"""

from __future__ import annotations

from consortia.common.audit import AuditLog, json_list, json_object
from consortia.server.federation import RoundListener, RunSummary
from consortia.server.rounds.label_skew import LabelSkew
from consortia.server.rounds.roster import Roster
from consortia.server.rounds.run_log import RoundRecord


class AuditedListener:
    """A `RoundListener` that also writes the run's audit entries."""

    def __init__(
        self,
        inner: RoundListener,
        audit: AuditLog,
        run_id: int,
        job_name: str,
        config_sha256: str,
        resumed_after: int = 0,
    ) -> None:
        self.inner = inner
        self.audit = audit
        self.run = str(run_id)
        self.job_name = job_name
        self.config_sha256 = config_sha256
        self.resumed_after = resumed_after

    def on_start(self, total_rounds: int, roster: Roster, skew: LabelSkew | None) -> None:
        self.audit.append(
            "job.resumed" if self.resumed_after else "job.started",
            run_id=self.run,
            job=self.job_name,
            config_sha256=self.config_sha256,
            rounds=total_rounds,
            nodes=json_list(roster.names),
            **({"after_round": self.resumed_after} if self.resumed_after else {}),
        )
        self.inner.on_start(total_rounds, roster, skew)

    def on_round_started(self, server_round: int) -> None:
        self.audit.append("round.started", run_id=self.run, round=server_round)
        self.inner.on_round_started(server_round)

    def on_round(self, record: RoundRecord) -> None:
        if record.round > self.resumed_after:
            self._record_round(record)
        self.inner.on_round(record)

    def _record_round(self, record: RoundRecord) -> None:
        for failure in record.failures:
            refusal = {} if failure.refusal is None else {"code": failure.refusal}
            self.audit.append(
                "update.rejected" if failure.refusal is None else "node.refusal",
                run_id=self.run,
                round=record.round,
                node=failure.node,
                reason=failure.reason,
                **refusal,
            )
        self.audit.append(
            "round.aggregated",
            run_id=self.run,
            round=record.round,
            participants=json_list(record.participants),
            accuracy=record.accuracy,
            epsilon=None if record.epsilon is None else json_object(record.epsilon),  # no DP
        )

    def finished(self, summary: RunSummary) -> None:
        self.audit.append(
            "job.finished",
            run_id=self.run,
            job=self.job_name,
            accuracy=summary.final.accuracy,
            epsilon=(None if summary.final.epsilon is None else json_object(summary.final.epsilon)),
            model_sha256=summary.final.model_sha256,
        )

    def failed(self, reason: str) -> None:
        self.audit.append("job.failed", run_id=self.run, job=self.job_name, reason=reason)
