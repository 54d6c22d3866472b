"""stats.html: a statistics job's findings on one self-contained page.

Every number on the page is DP-noised (or computed from noised numbers)
and is shown with its error bar at the query's confidence; a count below
the job's `min_count` reads "suppressed". Figures are inline PNGs.
"""

from __future__ import annotations

import html

from consortia.server.outputs import html_page as h
from consortia.server.outputs import plots
from consortia.server.statistics.stats_file import StatisticsFile
from consortia.server.statistics.summary import Estimate, StatisticsSummary

SUPPRESSED = "suppressed"


def render_statistics_report(result: StatisticsFile) -> str:
    """The whole page of `result` (stats.json's content)."""
    summary = result.summary
    sections = [_query_section(result), _refusals_section(result)]
    if summary is not None:
        sections += [
            _spend_section(summary),
            _labels_section(summary),
            _features_section(summary),
            _missing_section(summary),
            _accuracy_section(result, summary),
            _outliers_section(summary),
        ]
    name = result.manifest.config.get("name", "")
    return h.page(f"Consortia statistics: {name} ({result.manifest.run_name})", sections)


def _query_section(result: StatisticsFile) -> str:
    query, manifest = result.query, result.manifest
    noise = (
        f"σ = {query.noise_multiplier:g} per block"
        if query.noise_multiplier is not None
        else f"ε = {query.target_epsilon:g} per query (each node derives σ)"
    )
    rows = [
        ("job", str(manifest.config.get("name", ""))),
        ("nodes answered", f"{len(result.answered)} of {len(manifest.data_fingerprints)}"),
        ("noise", noise),
        ("error bars", f"{query.confidence:.0%} intervals"),
        ("suppressed below", f"{query.min_count:g} (noisy count)"),
        ("histogram bins", str(query.bins)),
        ("config sha256", manifest.config_sha256),
        ("started / finished (UTC)", f"{manifest.created_utc} / {result.finished_utc}"),
    ]
    if result.model is not None:
        rows.append(("model evaluated", f"{result.model.run_dir}, round {result.model.round}"))
    note = h.note(
        "Every figure below is a DP release of the nodes (or computed from one): the nodes "
        "added Gaussian noise of known std before anything left them, and charged the query to "
        "their privacy budgets. Error bars are the noise's, not the sampling's."
    )
    return h.section("Query", h.key_values(rows) + note)


def _refusals_section(result: StatisticsFile) -> str:
    if not result.refusals:
        return h.section("Refusals", h.note("None: every node answered."))
    rows = [[r.node, r.code, r.reason] for r in result.refusals]
    return h.section("Refusals", h.table(["node", "code", "reason"], rows))


def _spend_section(summary: StatisticsSummary) -> str:
    rows = [
        [
            node,
            f"{s.epsilon:.4f}",
            f"{s.epsilon_spent:.4f}",
            f"{s.delta:g}",
            f"{s.noise_multiplier:.4g}",
        ]
        for node, s in summary.spend.items()
    ]
    headers = ["node", "ε of this query", "ε of the dataset after it", "δ", "σ per block"]
    return h.section("Privacy spent", h.folded(h.table(headers, rows), len(rows), "nodes"))


def _labels_section(summary: StatisticsSummary) -> str:
    mixes = {"pooled": summary.labels_pooled, **summary.labels}
    shares = {name: [p.value or 0.0 for p in mix.proportions] for name, mix in mixes.items()}
    chart = plots.label_mix_png(shares, "Label mix per node (noisy; suppressed cells as 0)")
    classes = len(summary.labels_pooled.proportions)
    rows = [
        [
            name,
            _estimate(mix.records, "{:.0f}"),
            h.number(mix.skew, "{:.3f}"),
            h.number(mix.total_variation, "{:.3f}"),
            h.number(mix.jensen_shannon, "{:.3f}"),
            *(_estimate(p, "{:.3f}") for p in mix.proportions),
        ]
        for name, mix in mixes.items()
    ]
    headers = ["node", "records", "skew", "TV to pooled", "JS to pooled"]
    headers += [f"class {c}" for c in range(classes)]
    skewed = (
        h.note(
            f"Most skewed node: {summary.most_skewed}. Skew: the L2 distance of the node's mix "
            "to the pooled one, less what the noise alone adds; TV and JS distances include it."
        )
        if summary.most_skewed
        else ""
    )
    return h.section(
        "Labels",
        h.figure(chart, "label mix per node")
        + skewed
        + h.folded(h.table(headers, rows), len(rows), "nodes"),
    )


def _features_section(summary: StatisticsSummary) -> str:
    if not summary.features:
        text = "No feature was released"
        if summary.unranged:
            text += f" ({len(summary.unranged)} have no public range: set [statistics] ranges)"
        return h.section("Features", h.note(text + "."))
    nodes = list(summary.labels)
    names = [f.name for f in summary.features]
    shifts = [
        [plots.finite(f.nodes[n].shift) if n in f.nodes else 0.0 for f in summary.features]
        for n in nodes
    ]
    chart = plots.shift_heatmap_png(shifts, nodes, names)
    rows = []
    for feature in summary.features:
        node_shifts = [(n, v.shift) for n, v in feature.nodes.items() if v.shift is not None]
        shifted = max(node_shifts, key=lambda item: abs(item[1]), default=None)
        rows.append(
            [
                feature.name,
                f"[{feature.low:g}, {feature.high:g}]",
                _estimate(feature.pooled.mean, "{:.4g}"),
                h.number(feature.pooled.std, "{:.4g}"),
                "n/a" if shifted is None else f"{shifted[0]} ({shifted[1]:+.2f})",
            ]
        )
    headers = ["feature", "range", "pooled mean", "pooled std", "largest shift (node)"]
    body = h.figure(chart, "feature shift per node") + h.folded(
        h.table(headers, rows), len(rows), "features"
    )
    if summary.not_pooled:
        body += h.note(
            "Released on different ranges or bins by different nodes, so not pooled: "
            + ", ".join(summary.not_pooled)
        )
    if summary.unranged:
        unranged = ", ".join(summary.unranged)
        body += h.note(f"Not released (no public range; set [statistics] ranges): {unranged}")
    return h.section("Features", body)


def _missing_section(summary: StatisticsSummary) -> str:
    if not summary.missing:
        return h.section("Missing values", h.note("No node released missing-value counts."))
    columns = sorted({c for m in summary.missing.values() for c in m.per_column})
    rows = [
        [
            node,
            _estimate(m.records_read, "{:.0f}"),
            *(_estimate(m.per_column[c], "{:.0f}") if c in m.per_column else "" for c in columns),
        ]
        for node, m in summary.missing.items()
    ]
    table = h.table(["node", "records read", *columns], rows)
    return h.section("Missing values", h.folded(table, len(rows), "nodes"))


def _accuracy_section(result: StatisticsFile, summary: StatisticsSummary) -> str:
    if summary.accuracy_pooled is None:
        return ""
    per_node = {
        n: (plots.finite(a.accuracy.value), plots.finite(a.accuracy.error))
        for n, a in summary.accuracy.items()
    }
    chart = plots.estimates_png(per_node, "Accuracy per node (noisy)", "accuracy", (0.0, 1.0))
    rows = [[n, _estimate(a.accuracy, "{:.3f}")] for n, a in summary.accuracy.items()]
    rows.append(["pooled", _estimate(summary.accuracy_pooled.accuracy, "{:.3f}")])
    classes = [
        [f"class {c}", _estimate(e, "{:.3f}")]
        for c, e in enumerate(summary.accuracy_pooled.per_class)
    ]
    body = (
        h.figure(chart, "accuracy per node")
        + h.folded(h.table(["node", "accuracy"], rows), len(rows), "nodes")
        + "<h3>Per class (pooled)</h3>"
        + h.table(["class", "accuracy"], classes)
    )
    if summary.accuracy_pooled.per_group:
        groups = [[g, _estimate(e, "{:.3f}")] for g, e in summary.accuracy_pooled.per_group.items()]
        column = html.escape(summary.group_column or "")
        body += f"<h3>Per group of {column} (pooled)</h3>" + h.table(["group", "accuracy"], groups)
    model = result.model
    title = "Model accuracy" + (f" (round {model.round})" if model is not None else "")
    return h.section(title, body)


def _outliers_section(summary: StatisticsSummary) -> str:
    if not summary.outliers:
        return h.section("Outlier sites", h.note("None found (robust z-score above 3.5)."))
    rows = [[o.node, o.why] for o in summary.outliers]
    return h.section("Outlier sites", h.table(["node", "why"], rows))


def _estimate(estimate: Estimate, pattern: str) -> str:
    if estimate.value is None:
        return SUPPRESSED
    if estimate.error is None:
        return pattern.format(estimate.value)
    return f"{pattern.format(estimate.value)} ± {pattern.format(estimate.error)}"


__all__ = ["render_statistics_report"]
