"""A statistics job, top-down: roster -> one `query.statistics` per node -> summary -> files.

The same body serves `consortia job stats` (the coordinator's ServerApp)
and `consortia simulate --stats` (the simulation engine). Each node decides
for itself whether to answer, records the query's ε in its own account, and
sends only noisy numbers; a refusal is listed with its reason, like a
refused training round. The run folder gets `stats.json` (the manifest,
every node's release as received, the refusals and the summary) and the
self-contained page `stats.html`.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from consortia.common import protocol as p
from consortia.common.atomic import FileAccess, write_bytes_atomic, write_json_atomic
from consortia.common.config import JobConfig, ScenarioConfig, StatisticsConfig
from consortia.common.config_io import LoadedConfig
from consortia.common.errors import ConsortiaError, FederationError
from consortia.common.models import architecture_hash
from consortia.common.statistics import MESSAGE_TYPE, STATISTICS_KEY, StatisticsRelease
from consortia.common.weights import model_to_arrays
from consortia.server.outputs.manifest import build_manifest
from consortia.server.rounds.exchange import exchange, never_answered
from consortia.server.rounds.roster import Roster, discover
from consortia.server.statistics.stats_file import (
    STATS_HTML,
    STATS_JSON,
    EvaluatedModel,
    NodeRefusal,
    StatisticsFile,
)
from consortia.server.statistics.summary import summarize


def run_statistics(
    grid: Grid, loaded: LoadedConfig, out_dir: Path, runs_base: Path
) -> StatisticsFile:
    """Ask every node of the federation the job's statistics query; write stats.json/html.

    `runs_base` is where a relative `[statistics] model` run folder is found.
    """
    config = loaded.config
    query = config.statistics
    if query is None:
        raise FederationError(
            f"{loaded.source}: a statistics job needs a [statistics] block "
            "(noise_multiplier or target_epsilon, bins, ranges ...)"
        )
    simulation = config.simulation if isinstance(config, ScenarioConfig) else None
    job = config.job() if isinstance(config, ScenarioConfig) else config
    # The roster query would otherwise also ask for a label histogram, a release (and an
    # ε spent) the statistics query already makes.
    job = job.model_copy(update={"label_histogram": None})
    _seed(config.seed)
    arrays, evaluated, job = _model(query, runs_base, job)
    task = ConfigRecord({p.TASK_KEY: p.TaskSpec.for_nodes(job, simulation).encode()})
    expected = simulation.nodes if simulation is not None else config.min_nodes
    roster = discover(grid, task, expected, config.round_timeout_s)
    num_classes = _class_count(roster)
    manifest = build_manifest(
        out_dir.name,
        config,
        loaded.source,
        loaded.source_sha256,
        roster,
        "" if evaluated is None else evaluated.architecture,
    )
    replies = exchange(grid, _queries(roster, task, arrays), config.round_timeout_s)
    releases, refusals = _read_replies(
        replies, roster, config.round_timeout_s, lambda r: r.problem(num_classes, query.bins)
    )
    result = StatisticsFile(
        manifest=manifest,
        query=query,
        model=evaluated,
        finished_utc=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        answered=sorted(releases),
        refusals=refusals,
        releases=dict(sorted(releases.items())),
        summary=(
            summarize(releases, query.confidence, query.min_count, query.group_column)
            if releases
            else None
        ),
    )
    write_statistics(out_dir, result)
    return result


def write_statistics(out_dir: Path, result: StatisticsFile) -> None:
    """stats.json, then stats.html (each written atomically)."""
    from consortia.server.statistics.page import render_statistics_report

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / STATS_JSON, result.model_dump(mode="json"), FileAccess.UMASK)
    page = render_statistics_report(result)
    write_bytes_atomic(out_dir / STATS_HTML, page.encode("utf-8"), FileAccess.UMASK)


def read_statistics(path: Path) -> StatisticsFile:
    """A stats.json (or the stats.json of a folder)."""
    file = path / STATS_JSON if path.is_dir() else path
    try:
        return StatisticsFile.model_validate_json(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0]
        raise ConsortiaError(f"{file}: not a readable stats.json ({first})") from None


def _class_count(roster: Roster) -> int:
    """The class count every node reported. Feature layouts may differ (the summary pools
    features by name, and a node whose schema differs is itself a finding); classes may not."""
    counts = {node.num_classes for node in roster.nodes}
    if len(counts) != 1:
        detail = ", ".join(f"{n.name}: {n.num_classes}" for n in roster.nodes)
        raise FederationError(
            f"the nodes' datasets do not have one class count ({detail}); their schemas must "
            "declare the same classes"
        )
    return counts.pop()


def _queries(roster: Roster, task: ConfigRecord, arrays: ArrayRecord | None) -> list[Message]:
    content = RecordDict({p.CONFIG_KEY: task})
    if arrays is not None:
        content[p.ARRAYS_KEY] = arrays
    return [
        Message(content, dst_node_id=node.node_id, message_type=MESSAGE_TYPE)
        for node in roster.nodes
    ]


def _read_replies(
    replies: list[Message],
    roster: Roster,
    timeout_s: float,
    problem_of: Callable[[StatisticsRelease], str | None],
) -> tuple[dict[str, StatisticsRelease], list[NodeRefusal]]:
    """Each node's release, or why there is none (refused, failed, malformed, silent).

    `problem_of` says why a well-formed release still does not fit the query.
    """
    releases: dict[str, StatisticsRelease] = {}
    refusals: list[NodeRefusal] = []
    for reply in replies:
        node = roster.name_of(reply.metadata.src_node_id)
        if reply.has_error():
            # Flower's word in the node's place (it missed its heartbeats): no reply.
            code = p.RefusalCode.NO_REPLY if never_answered(reply) else p.RefusalCode.NODE_ERROR
            why = reply.error.reason or f"error code {reply.error.code}, no reason given"
            refusals.append(NodeRefusal(node=node, code=code, reason=why))
            continue
        refusal = p.read_refusal(reply.content)
        if refusal is not None:
            refusals.append(NodeRefusal(node=node, code=refusal[0], reason=refusal[1]))
            continue
        record = reply.content.config_records.get(STATISTICS_KEY)
        try:
            release = StatisticsRelease.decode(
                None if record is None else record.get(STATISTICS_KEY)
            )
        except FederationError as exc:
            refusals.append(
                NodeRefusal(node=node, code=p.RefusalCode.MALFORMED_RELEASE, reason=exc.message)
            )
            continue
        problem = problem_of(release)
        if problem is not None:
            refusals.append(
                NodeRefusal(node=node, code=p.RefusalCode.MALFORMED_RELEASE, reason=problem)
            )
            continue
        releases[node] = release
    heard = set(releases) | {r.node for r in refusals}
    refusals += [
        NodeRefusal(node=n, code=p.RefusalCode.NO_REPLY, reason=f"no reply within {timeout_s:g} s")
        for n in roster.names
        if n not in heard
    ]
    return releases, sorted(refusals, key=lambda r: r.node)


def _model(
    query: StatisticsConfig, runs_base: Path, job: JobConfig
) -> tuple[ArrayRecord | None, EvaluatedModel | None, JobConfig]:
    """The model the query evaluates, and the job as nodes get it (with that model's layout).

    The nodes build the model from the job's `[model]`; it is set to the
    evaluated run's own, so a statistics job need not repeat it.
    """
    if query.model is None:
        return None, None, job
    from consortia.server.outputs.model_registry import load_model

    run_dir = Path(query.model).expanduser()
    if not run_dir.is_absolute():
        run_dir = runs_base / run_dir
    loaded = load_model(run_dir, None)
    doc = loaded.checkpoint.doc
    evaluated = EvaluatedModel(
        run_dir=str(run_dir),
        round=doc.round,
        model_sha256=doc.model_sha256,
        architecture=architecture_hash(loaded.model),
    )
    job = job.model_copy(update={"model": loaded.config.model})
    return model_to_arrays(loaded.model), evaluated, job


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
