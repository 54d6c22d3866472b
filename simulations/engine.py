"""Running a scenario on Flower's simulation engine (Ray backend) on one machine."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from consortia.client.spend import check_simulated_target
from consortia.common.config import BackendConfig
from consortia.common.config_io import LoadedScenario
from consortia.common.errors import FederationError, PrivacyError
from consortia.common.models import build_model
from consortia.server.federation import RoundListener, RunSummary, run_federation
from consortia.server.outputs.resume import load_resume_point
from consortia.server.statistics.job import run_statistics
from consortia.server.statistics.stats_file import StatisticsFile
from consortia.simulations.lab import LAB, lab_client_app
from consortia.simulations.link_state import indexed_link_state
from consortia.simulations.node_data import simulated_node_data, source_of
from consortia.simulations.node_privacy import resumed_client_app
from consortia.simulations.ray_head import RayHead, ray_head
from consortia.simulations.ray_start import check_ray_address, cluster_address, ray_init_args
from consortia.simulations.virtual_node import virtual_node_app as client_app

_Result = TypeVar("_Result")


def simulate(
    loaded: LoadedScenario,
    out_dir: Path,
    listener: RoundListener,
    resume: Path | None = None,
    ray_address: str | None = None,
    head: RayHead | None = None,
) -> RunSummary:
    """Run `loaded` with one virtual SuperNode per simulated node; return its summary.

    The ServerApp runs in this process (so the listener can draw progress);
    the ClientApps run in Ray actors, one CPU each by default. With `resume`
    (a run folder), the run continues after its newest complete checkpoint,
    and the virtual nodes get back the privacy history they had then. With
    `ray_address` (`--ray-address`), the actors run on that existing Ray
    cluster instead of a Ray started for the run; where the nodes run is not
    part of the experiment, so it overrides `[simulation.backend]` without
    entering the run's configuration hash. With `head` (a sweep's, from
    `one_ray`), the run joins that Ray on this machine instead of starting
    its own; its actors are its own all the same (simulations/ray_head.py).
    """
    try:
        return _simulate(loaded, out_dir, listener, resume, ray_address, head)
    finally:
        _shutdown_ray()


def _simulate(
    loaded: LoadedScenario,
    out_dir: Path,
    listener: RoundListener,
    resume: Path | None,
    ray_address: str | None,
    head: RayHead | None,
) -> RunSummary:
    _preflight(loaded)
    _check_privacy_target(loaded)
    app = client_app
    if resume is not None:
        # Fails here, before Ray starts, on a finished run or a changed job.
        point = load_resume_point(resume, loaded.config)
        app = resumed_client_app(point.checkpoint.doc.releases)
    # The scenario's faults and adversaries, if any (simulations/lab.py).
    app = lab_client_app(app, loaded.config.simulation)
    return _on_engine(
        loaded,
        app,
        lambda grid: run_federation(grid, loaded, out_dir, listener, resume=resume, lab=LAB),
        ray_address,
        head,
    )


def simulate_statistics(
    loaded: LoadedScenario, out_dir: Path, ray_address: str | None = None
) -> StatisticsFile:
    """Run the scenario's `[statistics]` query over its virtual nodes; write stats.json/html.

    A relative `[statistics] model` run folder is found from the working folder.
    """
    try:
        _preflight(loaded)
        body = functools.partial(run_statistics, loaded=loaded, out_dir=out_dir, runs_base=Path())
        return _on_engine(loaded, client_app, body, ray_address)
    finally:
        _shutdown_ray()


def _on_engine(
    loaded: LoadedScenario,
    app: ClientApp,
    body: Callable[[Grid], _Result],
    ray_address: str | None,
    head: RayHead | None = None,
) -> _Result:
    """Run `body` as the ServerApp of a simulation of `loaded`'s nodes; its result."""
    address = cluster_address(ray_address, loaded.config.simulation.backend)
    if head is not None:
        head.check_running()
    elif address:
        check_ray_address(address)
    results: list[_Result] = []
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        results.append(body(grid))

    simulation = loaded.config.simulation
    _quiet_flower()
    with indexed_link_state():  # O(1) polls instead of Flower's O(nodes) scan each
        run_simulation(
            server_app=server_app,
            client_app=app,
            num_supernodes=simulation.nodes,
            backend_config=backend_config(simulation.backend, ray_address, head),
        )
    if not results:
        raise FederationError("the simulation ended before the run finished (see the log above)")
    return results[0]


def _preflight(loaded: LoadedScenario) -> None:
    """Load the data and build the model here first: a missing IDX folder or a
    model that does not fit the data should fail before Ray starts, not as
    error replies from every virtual node."""
    config = loaded.config
    source = source_of(config.simulation)
    build_model(config.model, source.feature_shape, source.num_classes, config.seed)


def _check_privacy_target(loaded: LoadedScenario) -> None:
    """Every virtual node's ε target must be reachable: refuse here, in one message.

    Each node calibrates its own noise when it first trains, inside Ray, and
    refuses an unreachable target then: after Ray has started, once per node.
    The coordinator knows every node's data size, so it runs the same check
    first (`check_simulated_target`: closed-form bounds, at most one ε
    evaluation per node size), in seconds, before Ray starts.
    """
    config = loaded.config
    sim = config.simulation
    sizes: dict[int, str] = {}
    for partition in range(sim.nodes):
        records = len(simulated_node_data(sim, config.seed, partition).train)
        sizes.setdefault(records, sim.node_name(partition))
    for records, node in sorted(sizes.items()):
        try:
            check_simulated_target(config, records)
        except PrivacyError as exc:
            raise PrivacyError(f"node {node} ({records} training records): {exc.message}") from None


@contextmanager
def one_ray(backend: BackendConfig) -> Iterator[RayHead]:
    """Ray on this machine, started once for several runs (a sweep's); stopped on exit.

    Started with the arguments a run's own Ray would get (`backend_config`;
    `backend` names no cluster), so a run that joins it sees the same CPUs
    and GPUs.
    """
    _quiet_flower()  # before the head starts: its processes inherit the environment
    with ray_head(backend_config(backend)["init_args"]) as head:
        yield head


def backend_config(
    backend: BackendConfig, ray_address: str | None = None, head: RayHead | None = None
) -> dict[str, Any]:
    """Flower's backend config: resources per virtual node and Ray's start arguments.

    A GPU, where this machine has one, is shared by four virtual nodes unless
    `gpus_per_node` says otherwise; on a cluster (`ray_address`) Ray places
    the actors by these resources, and `gpus_per_node` must be set to use
    the cluster's GPUs (this machine's CUDA says nothing about them). A
    sweep's `head` runs on this machine: its GPUs are this machine's.
    """
    init_args = ray_init_args(backend, head.address if head is not None else ray_address)
    on_this_machine = head is not None or "address" not in init_args
    gpus = backend.gpus_per_node
    if gpus is None:
        gpus = 0.25 if torch.cuda.is_available() and on_this_machine else 0.0
    if "address" not in init_args:
        init_args["num_gpus"] = torch.cuda.device_count()
    return {
        "client_resources": {"num_cpus": backend.cpus_per_node, "num_gpus": gpus},
        "init_args": init_args,
    }


def _quiet_flower() -> None:
    """Flower logs every round at INFO; consortia reports progress itself.

    ERROR also hides the notice that `run_simulation` is deprecated: it is the
    one entry point that runs a ServerApp in this process, which the progress
    bar and the returned summary need (`flwr run` starts a separate process).
    """
    logging.getLogger("flwr").setLevel(logging.ERROR)
    # Ray's notice about a future default for accelerator env vars, not for users.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def _shutdown_ray() -> None:
    try:
        import ray
    except ImportError:  # pragma: no cover - ray comes with flwr[simulation]
        return
    if ray.is_initialized():
        ray.shutdown()
