"""Baseline of `simulation_scale.py`: a scenario run the stock way, Flower + Opacus.

What a Flower user writes from Flower's and Opacus' tutorials, on the same
data split, model, batch size, learning rate and server optimiser as the
consortia scenario:

* ClientApp: each train message rebuilds the model, loads the global
  weights, wraps model, optimiser and loader with Opacus'
  `PrivacyEngine.make_private` (Poisson sampling, the scenario's clipping
  norm), trains `local_epochs` epochs, and computes the node's ε with
  Opacus' RDP accountant over its whole history (kept in the node's
  Context, never reset). The noise multiplier is calibrated once, here,
  and sent in the run config: calibrating in every node every round (what
  `make_private_with_epsilon` does) would cost the baseline 0.5 s per node
  per round and make the comparison meaningless.
* ServerApp: Flower's `FedAdam` (`flwr.serverapp.strategy`) with the
  scenario's η, all the scenario's sampled nodes, and centralized
  evaluation on the scenario's test set through `evaluate_fn`.
* Flower's simulation engine, Ray backend, stock `InMemoryLinkState`, one
  CPU per virtual node (as consortia's default).

Only the data loading is borrowed from consortia (the same partition), so
that both runs train on identical records.

Prints JSON lines on stdout: `{"event": "first_round", "t": ...}` when round
1 starts, then `{"event": "round", "round": r, "t": ..., "accuracy": ...}`
after each round (`t`: `time.time()`).

Usage: python benchmarks/stock_flower_simulation.py SCENARIO --data DIR --rounds R [--no-dp]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from functools import cache, lru_cache
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam
from flwr.simulation import run_simulation
from opacus import PrivacyEngine
from opacus.accountants.utils import get_noise_multiplier
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from worker_process import one_cpu_per_node  # this folder

from consortia.common.config import ScenarioConfig
from consortia.common.config_io import load_scenario
from consortia.common.models import build_model
from consortia.simulations.node_data import (
    centralized_test_data,
    scenario_with_data,
    simulated_node_data,
    source_of,
)

_HISTORY = "opacus-history"


def _emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, "t": time.time(), **fields}), flush=True)


@lru_cache(maxsize=2)
def _scenario(path: str, data: str, rounds: int) -> ScenarioConfig:
    loaded = load_scenario(path, {"rounds": rounds, "seed": None})
    return scenario_with_data(loaded, Path(data) if data else None).config


@cache
def _node_data(path: str, data: str, rounds: int, partition: int) -> TensorDataset:
    config = _scenario(path, data, rounds)
    train = simulated_node_data(config.simulation, config.seed, partition).train
    return TensorDataset(torch.as_tensor(train.x), torch.as_tensor(train.y))


def _fresh_model(config: ScenarioConfig) -> nn.Module:
    source = source_of(config.simulation)
    return build_model(config.model, source.feature_shape, source.num_classes, config.seed)


client = ClientApp()


@client.train()
def train(message: Message, context: Context) -> Message:
    """One round of local training, DP-SGD through Opacus' PrivacyEngine when `sigma` > 0."""
    torch.set_num_threads(1)
    run = message.content["config"]
    key = (str(run["scenario"]), str(run["data"]), int(run["rounds"]))
    config = _scenario(*key)
    training, privacy = config.training, config.privacy
    sigma = float(run["sigma"])
    model = _fresh_model(config)
    model.load_state_dict(message.content["arrays"].to_torch_state_dict())
    dataset = _node_data(*key, int(context.node_config["partition-id"]))
    loader = DataLoader(dataset, batch_size=training.batch_size, shuffle=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=training.learning_rate)
    trained: nn.Module = model
    engine = None
    if sigma > 0:
        engine = PrivacyEngine(accountant="rdp")
        history = context.state.config_records.get(_HISTORY)
        if history is not None:
            engine.accountant.history = [tuple(h) for h in json.loads(str(history["h"]))]
        trained, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=sigma,
            max_grad_norm=privacy.max_grad_norm,
        )
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(training.local_epochs):
        for x, y in loader:
            if len(y) == 0:
                continue
            optimizer.zero_grad()
            loss_fn(trained(x), y).backward()
            optimizer.step()
    metrics = MetricRecord({"num-examples": len(dataset)})
    if engine is not None:
        metrics["epsilon"] = engine.get_epsilon(privacy.delta)
        context.state[_HISTORY] = ConfigRecord({"h": json.dumps(engine.accountant.history)})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content, reply_to=message)


def _calibrated_sigma(config: ScenarioConfig) -> float:
    """The noise multiplier for the scenario's ε over all rounds, computed once."""
    privacy, training = config.privacy, config.training
    assert privacy.target_epsilon is not None
    records = len(simulated_node_data(config.simulation, config.seed, 0).train)
    steps = training.local_epochs * max(1, records // training.batch_size)
    return float(
        get_noise_multiplier(
            target_epsilon=privacy.target_epsilon,
            target_delta=privacy.delta,
            sample_rate=training.batch_size / records,
            steps=config.rounds * steps,
            accountant="rdp",
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario")
    parser.add_argument("--data", default="")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-dp", action="store_true")
    args = parser.parse_args()
    scenario = str(Path(args.scenario).resolve())
    data = str(Path(args.data).resolve()) if args.data else ""
    config = _scenario(scenario, data, args.rounds)
    sim = config.simulation
    sigma = 0.0 if args.no_dp or not config.privacy.enabled else _calibrated_sigma(config)
    test = centralized_test_data(sim, config.seed)
    test_x, test_y = torch.as_tensor(test.x), torch.as_tensor(test.y)

    def central_evaluation(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        if server_round == 0:
            _emit("first_round")
            return MetricRecord({})
        model = _fresh_model(config)
        model.load_state_dict(arrays.to_torch_state_dict())
        with torch.no_grad():
            accuracy = float((model(test_x).argmax(1) == test_y).float().mean())
        _emit("round", round=server_round, accuracy=accuracy)
        return MetricRecord({"accuracy": accuracy})

    server = ServerApp()

    @server.main()
    def serve(grid: Grid, context: Context) -> None:
        strategy = FedAdam(
            fraction_train=config.clients_per_round / sim.nodes,
            fraction_evaluate=0.0,
            min_train_nodes=config.clients_per_round,
            min_available_nodes=sim.nodes,
            eta=getattr(config.strategy, "eta", 0.1),
            eta_l=config.training.learning_rate,
        )
        run_config = {"scenario": scenario, "data": data, "rounds": args.rounds, "sigma": sigma}
        strategy.start(
            grid,
            ArrayRecord(_fresh_model(config).state_dict()),
            num_rounds=config.rounds,
            train_config=ConfigRecord(run_config),
            evaluate_fn=central_evaluation,
        )

    logging.getLogger("flwr").setLevel(logging.ERROR)
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=sim.nodes,
        backend_config=one_cpu_per_node(),
    )


if __name__ == "__main__":
    # Ray pickles the ClientApp by reference to its module: run it from the
    # importable module (this folder reaches the actors through PYTHONPATH,
    # which Flower's Ray backend sets from sys.path), not from `__main__`.
    import stock_flower_simulation

    stock_flower_simulation.main()
