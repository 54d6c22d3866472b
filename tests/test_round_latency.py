"""The node's short waits: the structure checks of Flower's patched modules, and the worker.

Fast tests, no processes. The structure checks run on the installed Flower
with its source, so an upgrade that moves a patched wait fails here (instead
of the node quietly falling back to Flower's 3 s). The worker is driven
through a real SuperNode runtime API (Flower's own FastAPI app and
NodeState, served on 127.0.0.1 in a thread): the same calls it makes next
to `flower-supernode --isolation process`.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import socket
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import flower_context
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode, SubStatus
from flwr.supercore.fab import Fab

from consortia.client import clientapp_worker, supernode_launcher
from consortia.client.clientapp_worker import (
    CLIENTAPP,
    ForeignClientAppError,
    Worker,
    answer,
    check_clientapp,
    fresh_process_state,
)
from consortia.common import flower_waits
from consortia.common.flower_waits import (
    DEFAULT_HEARTBEAT_INTERVAL_S,
    HEARTBEAT_MODULES,
    MAX_HEARTBEAT_INTERVAL_S,
    MIN_HEARTBEAT_INTERVAL_S,
    SUPERNODE_LOOP_MODULE,
    CappedSleep,
    FlowerStructureError,
    check_object_pull,
    check_supernode_loop,
    flower_pull_patience_s,
)

# Every Flower reference the node replaces: (module, name, the function that calls it).
OBJECT_PULLS = [
    (SUPERNODE_LOOP_MODULE, "pull_objects", "_pull_and_store_message"),
    (clientapp_worker.RUN_CLIENTAPP_MODULE, "pull_and_inflate_object_from_tree", "pull_task_input"),
]


# ------------------------------------------------------------------ Flower's structure


def test_the_supernode_loop_still_sleeps_where_the_launcher_caps_it() -> None:
    check_supernode_loop(importlib.import_module(SUPERNODE_LOOP_MODULE), require_source=True)


@pytest.mark.parametrize(("module", "name", "caller"), OBJECT_PULLS)
def test_the_object_pulls_are_still_reached_where_they_are_rebound(
    module: str, name: str, caller: str
) -> None:
    check_object_pull(importlib.import_module(module), name, caller)


def _module_from(tmp_path: Path, source: str) -> ModuleType:
    path = tmp_path / "changed_flower.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("changed_flower", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LOOP = """
import time


def start_client_internal():
    while True:
        if receive() is None:
            time.sleep({idle})
            continue
        while not reply():
            time.sleep(0.5)
"""


@pytest.mark.parametrize(
    ("source", "complaint"),
    [
        (LOOP.format(idle=3), None),
        (LOOP.format(idle=5), "expected only 3 s and 0.5 s"),
        (LOOP.format(idle=3).replace("time.sleep(0.5)", "pass"), None),
        (LOOP.format(idle=3).replace("time.sleep(3)", "pass"), "no longer sleeps 3 s"),
        (
            LOOP.format(idle=3).replace("import time", "import time\nfrom time import sleep"),
            "imports",
        ),
        (LOOP.format(idle=3) + "\nSTART = time.monotonic()\n", "time.monotonic"),
        (LOOP.format(idle=3).replace("import time", "import time as clock"), "no module-level"),
    ],
)
def test_a_changed_supernode_loop_is_refused(
    tmp_path: Path, source: str, complaint: str | None
) -> None:
    module = _module_from(tmp_path, source)
    if complaint is None:
        check_supernode_loop(module, require_source=True)
        return
    with pytest.raises(FlowerStructureError, match=complaint):
        check_supernode_loop(module, require_source=True)


def test_a_changed_object_pull_is_refused(tmp_path: Path) -> None:
    module = _module_from(
        tmp_path,
        "from flwr.supercore.inflatable.inflatable_utils import pull_objects\n\n"
        "def fetch():\n    return pull_objects([], None)\n\n"
        "def elsewhere():\n    return None\n",
    )
    check_object_pull(module, "pull_objects", "fetch")
    with pytest.raises(FlowerStructureError, match="no longer calls"):
        check_object_pull(module, "pull_objects", "elsewhere")
    module.pull_objects = lambda *args, **kwargs: {}
    with pytest.raises(FlowerStructureError, match="not Flower's"):
        check_object_pull(module, "pull_objects", "fetch")


# ------------------------------------------------------------------ the launcher's patches


def test_capped_sleep_is_short_during_a_job_and_flowers_own_between_jobs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slept: list[float] = []
    monkeypatch.setattr(flower_waits.time, "sleep", slept.append)  # record, do not wait
    shim = CappedSleep(0.2, local_cap_s=0.01, window_s=60)
    shim.sleep(3)  # idle since start: Flower's own wait
    shim.sleep(0.5)  # waiting for a reply: a message is in hand
    shim.sleep(3)  # the next pull of the job: short
    assert slept == [3, 0.01, 0.2]
    shim._last_message -= 61  # a minute without a message: idle again
    shim.sleep(3)
    assert slept[-1] == 3
    assert shim.monotonic is flower_waits.time.monotonic  # all but `sleep` is the real module
    with pytest.raises(ValueError, match="positive"):
        CappedSleep(0)


def test_the_launcher_patches_only_flowers_references(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = importlib.import_module(SUPERNODE_LOOP_MODULE)
    monkeypatch.setattr(loop, "time", loop.time)  # restored after the test
    monkeypatch.setattr(loop, "pull_objects", loop.pull_objects)
    beats = [importlib.import_module(name) for name in HEARTBEAT_MODULES]
    for module in beats:
        monkeypatch.setattr(module, "HEARTBEAT_DEFAULT_INTERVAL", module.HEARTBEAT_DEFAULT_INTERVAL)
    supernode_launcher.install(0.1, 15.0)
    supernode_launcher.install(0.1, 15.0)  # idempotent: the checks accept their own patches
    assert isinstance(loop.time, CappedSleep) and loop.time.active_s == 0.1
    # The interval the node declares to the SuperLink, and the pace it keeps.
    assert [module.HEARTBEAT_DEFAULT_INTERVAL for module in beats] == [15.0, 15.0]
    # Sooner retries, the same patience: bounded by Flower's time, not by its 500 tries
    # (which 50 ms-1 s waits would use up in minutes; a loaded SuperLink can take longer).
    assert loop.pull_objects.keywords == {
        "initial_backoff": 0.05,
        "backoff_cap": 1.0,
        "max_tries_per_object": None,
        "max_time": flower_pull_patience_s(),
    }
    assert 4_900 < flower_pull_patience_s() <= 7_200  # Flower's 500 tries of 1-10 s, 2 h at most
    assert time.sleep is not loop.time.sleep  # the process's own `time` is untouched
    from flwr.supercore.inflatable import inflatable_utils

    assert loop.pull_objects.func is inflatable_utils.pull_objects


def test_node_toml_poll_interval_is_bounded(tmp_path: Path) -> None:
    from consortia.client.node_config import load_node_config
    from consortia.common.errors import ConfigError

    node_toml = tmp_path / "node.toml"
    node_toml.write_text('name = "a"\nstate_dir = "state"\n')
    assert load_node_config(node_toml).poll_interval_s == flower_waits.DEFAULT_POLL_INTERVAL_S
    node_toml.write_text('name = "a"\nstate_dir = "state"\npoll_interval_s = 0\n')
    with pytest.raises(ConfigError, match="poll_interval_s"):
        load_node_config(node_toml)


# ------------------------------------------------------------------ the worker


def _fab(clientapp: str) -> Fab:
    """An app bundle holding only a pyproject.toml that names `clientapp`."""
    pyproject = (
        '[project]\nname = "job"\nversion = "1.0.0"\ndependencies = []\n\n'
        '[tool.flwr.app]\npublisher = "someone"\n\n'
        f'[tool.flwr.app.components]\nserverapp = "consortia.server.app:app"\n'
        f'clientapp = "{clientapp}"\n\n[tool.flwr.app.config]\n'
    )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        bundle.writestr("pyproject.toml", pyproject)
    content = buffer.getvalue()
    return Fab(hash_str=hashlib.sha256(content).hexdigest(), content=content, verifications={})


class SpyApp:
    """A ClientApp whose query handler counts its calls (or raises)."""

    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.fail = fail
        self.app = ClientApp()

        @self.app.query()
        def query(message: Message, context: Context) -> Message:
            self.calls += 1
            if self.fail:
                raise ZeroDivisionError("division by zero")
            context.state["seen"] = ConfigRecord({"calls": self.calls})
            return Message(RecordDict(), reply_to=message)


def _query() -> Message:
    message = Message(RecordDict(), dst_node_id=7, message_type=MessageType.QUERY)
    message.metadata.__dict__["_message_id"] = message.object_id  # as pulled from a SuperNode
    return message


@pytest.mark.usefixtures("task_identity")
def test_the_worker_refuses_a_foreign_clientapp_without_running_it() -> None:
    spy = SpyApp()
    outcome = answer(spy.app, _query(), flower_context(), _fab("shipped.code:app"))
    assert spy.calls == 0
    assert outcome.sub_status == SubStatus.FAILED
    assert outcome.reply is not None and outcome.reply.has_error()
    assert outcome.reply.error.code == ErrorCode.LOAD_CLIENT_APP_EXCEPTION
    assert "'shipped.code:app'" in outcome.reply.error.reason
    assert CLIENTAPP in outcome.details
    with pytest.raises(ForeignClientAppError, match="no readable"):
        check_clientapp(Fab(hash_str="0" * 64, content=b"not a zip", verifications={}))


@pytest.mark.usefixtures("task_identity")
def test_the_worker_runs_consortias_clientapp_and_turns_exceptions_into_error_replies() -> None:
    from consortia.server.coordinator.jobs import build_job_fab

    content, digest = build_job_fab('name = "job"\n', "job.toml")
    fab = Fab(hash_str=digest, content=content, verifications={})
    spy = SpyApp()
    outcome = answer(spy.app, _query(), flower_context(), fab)
    assert spy.calls == 1
    assert outcome.sub_status == SubStatus.COMPLETED and outcome.details == ""
    assert outcome.reply is not None and not outcome.reply.has_error()

    failing = SpyApp(fail=True)
    outcome = answer(failing.app, _query(), flower_context(), fab)
    assert outcome.sub_status == SubStatus.FAILED
    assert outcome.reply is not None and outcome.reply.has_error()
    assert outcome.reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    # Flower's own format (run_clientapp.py), so the coordinator reads it as it always did.
    assert outcome.reply.error.reason == "<class 'ZeroDivisionError'>:<'division by zero'>"


def test_the_worker_gives_back_a_fresh_processs_torch_settings() -> None:
    threads = torch.get_num_threads()
    state = torch.random.get_rng_state()
    with fresh_process_state():
        torch.set_num_threads(1)
        torch.manual_seed(123)
        torch.rand(3)
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.random.get_rng_state(), state)


# ------------------------------------------------------------------ against a SuperNode's API


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RuntimeApi:
    """A SuperNode's runtime API on 127.0.0.1 with Flower's NodeState; messages put in by hand."""

    def __init__(self) -> None:
        import uvicorn
        from flwr.supercore.object_store import ObjectStoreFactory
        from flwr.supernode.main import create_app
        from flwr.supernode.nodestate import NodeStateFactory

        self.factory = NodeStateFactory(objectstore_factory=ObjectStoreFactory())
        self.state = self.factory.state()
        self.store = self.factory.objectstore_factory.store()
        self.state.set_node_id(7)
        self.port = _free_port()
        config = uvicorn.Config(
            create_app(state_factory=self.factory), host="127.0.0.1", port=self.port
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the runtime API did not start"
            time.sleep(0.02)

    def submit(self, fab: Fab, message: Message, run_id: int = 1) -> None:
        """What the SuperNode does with a message it pulled (start_client_internal)."""
        from flwr.supercore.constant import TaskType
        from flwr.supercore.run import Run
        from flwr.supernode.start_client_internal import _insert_message

        run = Run.create_empty(run_id)
        run.fab_hash = fab.hash_str
        self.state.store_run(run)
        self.state.store_fab(fab)
        self.state.set_run_series_context(run.series_id, flower_context())
        _insert_message(message, self.state, self.store)
        task_id = self.state.create_task(
            task_type=TaskType.CLIENT_APP, run_id=run_id, fab_hash=fab.hash_str
        )
        assert task_id is not None

    def replies(self) -> list[Message]:
        return list(self.state.get_messages_legacy(is_reply=True))

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def runtime_api() -> Iterator[RuntimeApi]:
    api = RuntimeApi()
    try:
        yield api
    finally:
        api.close()


def _serve_one(worker: Worker) -> None:
    """One turn of the worker's loop: acquire the pending task and run it."""
    token = worker.acquire()
    assert token is not None
    with fresh_process_state():
        worker.run_task(token)
    assert worker.acquire() is None  # nothing else is pending


@pytest.mark.usefixtures("task_identity")
def test_the_worker_serves_a_task_through_the_runtime_api(runtime_api: RuntimeApi) -> None:
    from consortia.server.coordinator.jobs import build_job_fab

    content, digest = build_job_fab('name = "job"\n', "job.toml")
    fab = Fab(hash_str=digest, content=content, verifications={})
    spy = SpyApp()
    worker = Worker(f"127.0.0.1:{runtime_api.port}", spy.app, poll_interval_s=0.05)

    runtime_api.submit(fab, _query())
    _serve_one(worker)
    (reply,) = runtime_api.replies()
    assert not reply.has_error() and spy.calls == 1
    (task,) = runtime_api.state.get_tasks()
    assert task.status.sub_status == SubStatus.COMPLETED
    # The Context the ClientApp changed went back to the SuperNode (push_task_output).
    assert "seen" in runtime_api.state.get_run_series_context(0).state


@pytest.mark.usefixtures("task_identity")
def test_the_worker_answers_a_foreign_bundle_with_an_error_reply_and_goes_on(
    runtime_api: RuntimeApi,
) -> None:
    spy = SpyApp()
    worker = Worker(f"127.0.0.1:{runtime_api.port}", spy.app, poll_interval_s=0.05)
    runtime_api.submit(_fab("shipped.code:app"), _query())
    _serve_one(worker)
    (reply,) = runtime_api.replies()
    assert reply.has_error() and reply.error.code == ErrorCode.LOAD_CLIENT_APP_EXCEPTION
    assert spy.calls == 0
    (task,) = runtime_api.state.get_tasks()
    assert task.status.sub_status == SubStatus.FAILED


# ------------------------------------------------------------------ the node's command lines


def test_node_start_runs_the_launcher_and_the_worker_or_flowers_stock_node(
    tmp_path: Path,
) -> None:
    from consortia.client.node_config import load_node_config
    from consortia.client.supernode_service import node_commands

    node_toml = tmp_path / "node.toml"
    node_toml.write_text(
        'name = "a"\nstate_dir = "state"\nruntime_port = 9555\npoll_interval_s = 0.5\n\n'
        '[superlink]\naddress = "fl.example.org:9093"\nroot_certificates = "ca.crt"\n'
    )
    config = load_node_config(node_toml)
    key = tmp_path / "state" / "keys" / "node.key"
    ours = node_commands(config, node_toml, key)
    assert ours.supernode[1:3] == ["-m", "consortia.client.supernode_launcher"]
    assert ours.supernode[3:5] == ["--poll-interval-s", "0.5"]
    assert ours.supernode[5:7] == ["--heartbeat-interval-s", "30.0"]  # Flower's, by default
    assert ours.supernode[-2:] == ["--isolation", "process"]  # no SuperExec, no flwr-clientapp
    for flag, value in (
        ("--superlink", "fl.example.org:9093"),
        ("--root-certificates", str(tmp_path / "ca.crt")),
        ("--auth-supernode-private-key", str(key)),
        ("--port", "9555"),
    ):
        assert ours.supernode[ours.supernode.index(flag) + 1] == value
    assert ours.worker is not None
    assert ours.worker[1:3] == ["-m", "consortia.client.clientapp_worker"]
    assert ours.worker[ours.worker.index("--runtime-api-address") + 1] == "127.0.0.1:9555"

    stock = node_commands(config, node_toml, key, stock=True)
    assert stock.worker is None
    assert Path(stock.supernode[0]).name == "flower-supernode"
    assert "--isolation" not in stock.supernode
    assert stock.supernode[1:] == ours.supernode[7:-2]  # the same Flower arguments otherwise


def test_the_heartbeat_bounds_are_flowers() -> None:
    from flwr.common import constant

    assert (
        DEFAULT_HEARTBEAT_INTERVAL_S,
        MIN_HEARTBEAT_INTERVAL_S,
        MAX_HEARTBEAT_INTERVAL_S,
    ) == (
        constant.HEARTBEAT_DEFAULT_INTERVAL,
        constant.HEARTBEAT_MIN_INTERVAL,
        constant.HEARTBEAT_MAX_INTERVAL,
    )
