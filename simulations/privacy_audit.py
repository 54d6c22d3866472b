"""`consortia audit privacy RUN`: membership-inference attacks on a simulation run's model.

The lab knows what a real coordinator never does: which records each node
trained on (its train split) and which it held out (its test split), both
regenerated exactly from the run's manifest (scenario, seed, partition).
Members are the nodes' training records, non-members their held-out ones,
balanced and pooled over the nodes. The attacks (client/membership_attack.py):
loss threshold, LiRA with shadow models, and

* **canaries**, where the scenario plants them (`[simulation.canaries]`):
  crafted records only memorisation can fit, each trained on by a coin
  flip; the loss threshold tells the trained from the untrained ones. This
  is the DP game played once per canary, the audit's rigorous form.

Each attack's figures (common/membership.py, written to privacy-audit.json
and shown in the run's report.html): AUC, TPR at 0.1% and 1% FPR,
and the ε lower bound it proves at 95% confidence, beside the largest ε a
node claimed at the audited round. A per-record attack on a federated model
is a heuristic audit: the bound treats every record as an independent trial
of the DP game, which is how published audits of trained models read it;
see docs/privacy-audit.md for what it can and cannot show. A deployed
node audits a global model on its own records with `consortia node audit`
(client/node_privacy_audit.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from consortia.client.membership_attack import (
    ShadowRecipe,
    balanced,
    figures,
    record_losses,
    standard_attacks,
)
from consortia.common.arrays import LabeledArrays, concat
from consortia.common.atomic import FileAccess, write_bytes_atomic
from consortia.common.config import ScenarioConfig
from consortia.common.errors import ConsortiaError
from consortia.common.membership import AUDIT_FILE, PrivacyAudit
from consortia.server.outputs.model_registry import load_model
from consortia.server.outputs.run_outputs import rewrite_report
from consortia.simulations.lab import LAB
from consortia.simulations.node_data import Canaries, canaries_of, simulated_node_data


def audit_run(run_dir: Path, server_round: int | None, shadows: int, seed: int = 0) -> PrivacyAudit:
    """Attack the model of `server_round` (default: the newest); write and return the result."""
    loaded = load_model(run_dir, server_round)
    doc, config, model = loaded.checkpoint.doc, loaded.config, loaded.model
    if not isinstance(config, ScenarioConfig):
        raise ConsortiaError(
            f"{run_dir}: a deployed job's run; its records are on the nodes: each node audits "
            "the model on its own records with `consortia node audit` (docs/privacy-audit.md)"
        )
    rng = np.random.default_rng(seed)
    planted = canaries_of(config.simulation, config.seed)
    members, non_members = _audit_records(config, planted, rng)
    recipe = ShadowRecipe(config.job(), tuple(doc.feature_shape), doc.num_classes)
    delta = config.privacy.delta
    attacks = standard_attacks(model, members, non_members, recipe, shadows, delta, rng)
    if planted is not None:
        # Each canary was trained on by a coin flip: the DP game itself, once per canary.
        scores = -record_losses(model, planted.records)
        inside = planted.inside
        ordered = np.concatenate([scores[inside], scores[~inside]])
        name = f"canaries ({len(scores)}, loss threshold)"
        attacks.append(figures(name, ordered, int(inside.sum()), delta, rng))
    audit = PrivacyAudit(
        run=run_dir.name,
        round=doc.round,
        claimed_epsilon=max(doc.epsilon.values(), default=0.0) if config.privacy.enabled else None,
        delta=delta,
        shadows=shadows,
        attacks=attacks,
    )
    write_bytes_atomic(
        run_dir / AUDIT_FILE, audit.model_dump_json(indent=2).encode("utf-8"), FileAccess.UMASK
    )
    rewrite_report(run_dir, LAB.label_counts(config))  # report.html gains its audit section
    return audit


def _audit_records(
    config: ScenarioConfig, planted: Canaries | None, rng: np.random.Generator
) -> tuple[LabeledArrays, LabeledArrays]:
    """Every node's train split (members) and test split (non-members), balanced.

    The canary node's planted canaries (appended last) are left out: they
    have an attack of their own.
    """
    sim = config.simulation
    canary_node = sim.canaries.node - 1 if sim.canaries is not None else None
    trains, tests = [], []
    for partition in range(sim.nodes):
        data = simulated_node_data(sim, config.seed, partition)
        train = data.train
        if planted is not None and partition == canary_node:
            train = train.subset(np.arange(len(train) - int(planted.inside.sum())))
        trains.append(train)
        tests.append(data.test)
    hint = "in all the run's nodes; raise simulation.data.test_fraction or add records"
    return balanced(concat(trains), concat(tests), rng, hint)
