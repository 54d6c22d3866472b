"""Flower's fixed waits on a deployment, shortened in place, each behind a structure check.

Flower 1.41 waits in three places where it has no setting, and on a
deployment each wait lands in every exchange of every round:

- the SuperNode's main loop (`flwr.supernode.start_client_internal`) sleeps
  3 s after every pull from the SuperLink that brings no message, and 0.5 s
  at a time while it waits for the ClientApp's reply in its own memory
  (`CappedSleep`: the poll interval while the node takes part in a job,
  20 ms for the local waits);
- every object pull (`flwr.supercore.inflatable.inflatable_utils.pull_objects`,
  reached through `pull_and_inflate_object_from_tree` by the ClientApp side,
  and directly by the SuperNode and by the ServerApp's `HttpGrid`) backs off
  1 s, then 2 s, ... when an object is not stored yet. That is the common
  case right after a message appears: the SuperNode creates the ClientApp's
  task before it has pulled the weights, and a reply becomes visible to the
  ServerApp while its objects are still being uploaded.

Each fix here replaces a *reference inside one Flower module* (its `time`
global, or its imported pull function), never Flower's functions
themselves, so other code in the process is unaffected. A patch depends on
how Flower wrote that module, so each has a check that raises
`FlowerStructureError` when the module no longer looks the way the patch
assumes; the patch functions run it first, and tests/test_round_latency.py
runs it (with the source) so a Flower upgrade fails the test suite instead
of quietly bringing the waits back.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import math
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

from consortia.common.errors import ConsortiaError

SUPERNODE_LOOP_MODULE = "flwr.supernode.start_client_internal"
DEFAULT_POLL_INTERVAL_S = 0.2
# Flower's HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_MIN_INTERVAL and HEARTBEAT_MAX_INTERVAL
# (flwr.common.constant; tests/test_flower_waits.py checks they still are).
DEFAULT_HEARTBEAT_INTERVAL_S = 30.0
MIN_HEARTBEAT_INTERVAL_S = 10.0
MAX_HEARTBEAT_INTERVAL_S = 1800.0
FIRST_RETRY_S = 0.02  # first retry of a wait on this machine (loopback, in memory)
# Retrying an object on the coordinator: each try is an authenticated request to a
# SuperLink that serves every node, so start a little later and back off further.
REMOTE_FIRST_RETRY_S = 0.05
REMOTE_RETRY_CAP_S = 1.0
# What Flower's SuperNode loop sleeps (checked): after an empty pull (each
# costs a request to the SuperLink), and between looks at its own memory.
IDLE_SLEEP_S = 3
LOCAL_SLEEP_S = 0.5
LOCAL_WAIT_S = 0.02  # a look at the SuperNode's in-memory state is cheap: 50 a second
# How long after its last message a node counts as taking part in a job: it polls the
# coordinator every `poll_interval_s` meanwhile, and as Flower does (3 s) after.
ACTIVE_WINDOW_S = 60.0


class FlowerStructureError(ConsortiaError):
    """The installed Flower no longer has the structure a wait patch replaces."""


class CappedSleep:
    """Stands in for the `time` module inside Flower's SuperNode loop: shorter sleeps.

    `sleep(s)` is called by that loop in two situations, told apart by `s`:

    - s ≥ 3 s: its pull from the SuperLink brought no message. While the
      node takes part in a job (it handled a message within the last
      `window_s`), the next pull comes after `active_s` (node.toml
      `poll_interval_s`): the next message of a round follows the last one
      within seconds. An idle node (no message for `window_s`) waits
      Flower's own `s`, so between jobs it costs the coordinator no more
      requests than a stock node does.
    - shorter s: it waits on its own memory for the ClientApp's reply, so a
      message is in hand (this marks the node active); at most
      `local_cap_s`.

    Every other attribute is the real `time` module's.
    """

    def __init__(
        self,
        active_s: float,
        local_cap_s: float = LOCAL_WAIT_S,
        window_s: float = ACTIVE_WINDOW_S,
    ) -> None:
        if not (active_s > 0 and local_cap_s > 0 and window_s >= 0):
            raise ValueError(f"waits must be positive, got {active_s!r}, {local_cap_s!r}")
        self.active_s = active_s
        self.local_cap_s = local_cap_s
        self.window_s = window_s
        self._last_message = -math.inf

    @property
    def active(self) -> bool:
        """Whether the node handled a message within the last `window_s`."""
        return time.monotonic() - self._last_message < self.window_s

    def sleep(self, seconds: float) -> None:
        if seconds >= IDLE_SLEEP_S:
            time.sleep(min(seconds, self.active_s) if self.active else seconds)
        else:
            self._last_message = time.monotonic()
            time.sleep(min(seconds, self.local_cap_s))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def check_supernode_loop(module: ModuleType, *, require_source: bool = False) -> None:
    """Raise `FlowerStructureError` unless `module` sleeps only as `CappedSleep` assumes.

    Checked: the module's `time` global is the `time` module (or an installed
    `CappedSleep`) and `start_client_internal` reaches it by that name; from
    the source (skipped when it is not installed, unless `require_source`):
    `time` is used for `sleep` alone, nothing is imported from `time`, every
    sleep is of a constant 3 s or 0.5 s, and the 3 s one (the idle pull) is
    in `start_client_internal`.
    """
    reference = getattr(module, "time", None)
    if reference is not time and not isinstance(reference, CappedSleep):
        raise _changed(module, f"it has no module-level `time` import (found {reference!r})")
    loop = getattr(module, "start_client_internal", None)
    if loop is None or "time" not in loop.__code__.co_names:
        raise _changed(module, "`start_client_internal` no longer uses its `time` global")
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError) as exc:
        if require_source:
            raise _changed(module, f"its source cannot be read ({exc})") from exc
        return
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "time":
            names = [alias.name for alias in node.names]
            raise _changed(module, f"it imports {names} from `time` (line {node.lineno})")
        if isinstance(node, ast.Attribute) and _is_time(node.value) and node.attr != "sleep":
            raise _changed(module, f"it uses `time.{node.attr}` (line {node.lineno})")
    sleeps = _sleep_calls(tree)
    odd = [(line, value) for line, value in sleeps if value not in (IDLE_SLEEP_S, LOCAL_SLEEP_S)]
    if odd:
        raise _changed(module, f"it sleeps {odd} (line, seconds); expected only 3 s and 0.5 s")
    if not any(value == IDLE_SLEEP_S for _, value in _sleep_calls(_function(tree, loop))):
        raise _changed(module, "`start_client_internal` no longer sleeps 3 s after an empty pull")


def install_supernode_poll_interval(poll_interval_s: float) -> CappedSleep:
    """Cap the sleeps of Flower's SuperNode loop (checked first); the installed stand-in."""
    module = importlib.import_module(SUPERNODE_LOOP_MODULE)
    check_supernode_loop(module)
    shim = CappedSleep(poll_interval_s)
    # The module's own `time` global only, set through its namespace (ModuleType declares none).
    vars(module)["time"] = shim
    return shim


# Where Flower's SuperNode reads its heartbeat interval: the interval it declares to
# the SuperLink (activation, each heartbeat) and the pace of its heartbeat thread.
HEARTBEAT_MODULES = ("flwr.supernode.fleet_http_connection", "flwr.supercore.heartbeat")
HEARTBEAT_CONSTANT = "HEARTBEAT_DEFAULT_INTERVAL"


def install_heartbeat_interval(interval_s: float) -> None:
    """Make this process's SuperNode heartbeat every `interval_s` (checked first).

    The SuperLink counts a node gone `HEARTBEAT_PATIENCE` (2) intervals after
    its last heartbeat, using the interval the node declared, so a shorter
    interval notices a dead node sooner (Flower's 30 s: a minute). Flower has
    no setting for it; both modules read the constant at call time.
    """
    modules = [importlib.import_module(name) for name in HEARTBEAT_MODULES]
    for module in modules:
        if not isinstance(vars(module).get(HEARTBEAT_CONSTANT), int | float):
            raise _changed(module, f"it has no module-level {HEARTBEAT_CONSTANT}")
    for module in modules:
        vars(module)[HEARTBEAT_CONSTANT] = interval_s


def check_object_pull(module: ModuleType, name: str, caller: str) -> Callable[..., Any]:
    """The Flower pull function `module.<name>` that `module.<caller>` calls; else raise.

    `caller` names a function of `module`, or a method ("Class.method").

    `name` must be Flower's `pull_objects` or `pull_and_inflate_object_from_tree`
    (or a binding of it made here), reached by `caller` through the module's
    globals, and still take `initial_backoff` and `backoff_cap`.
    """
    from flwr.supercore.inflatable import inflatable_utils

    calling: Any = module
    for part in caller.split("."):  # a function, or a method: "HttpGrid.pull_messages"
        calling = getattr(calling, part, None)
    code = getattr(calling, "__code__", None)
    if code is None or name not in code.co_names:
        raise _changed(module, f"`{caller}` no longer calls `{name}` through its globals")
    current = getattr(module, name, None)
    if isinstance(current, functools.partial):
        current = current.func
    flower = getattr(inflatable_utils, name, None)
    if current is not flower or flower is None:
        raise _changed(module, f"its `{name}` is not Flower's inflatable_utils.{name}")
    missing = {"initial_backoff", "backoff_cap"} - set(inspect.signature(flower).parameters)
    if missing:
        raise _changed(module, f"`{name}` takes no {sorted(missing)}")
    return flower


def flower_pull_patience_s() -> float:
    """How long Flower's `pull_objects` keeps retrying an object that is not stored yet.

    Its defaults bound a pull by tries (500, the waits doubling from 1 s to
    10 s: about 83 minutes) and by time (2 hours), whichever comes first.
    """
    from flwr.supercore import constant

    waits = (
        min(constant.PULL_INITIAL_BACKOFF * 2**attempt, constant.PULL_BACKOFF_CAP)
        for attempt in range(constant.PULL_MAX_TRIES_PER_OBJECT - 1)
    )
    return float(min(sum(waits), constant.PULL_MAX_TIME))


def shorten_object_pull_backoff(
    module_name: str, name: str, caller: str, first_s: float, cap_s: float
) -> None:
    """Make `module_name.<caller>` retry an object that is not stored yet after `first_s`.

    Flower's first retry comes after 1 s, doubling to 10 s; here after
    `first_s`, doubling to `cap_s`. How long a pull may take in total is
    Flower's (`flower_pull_patience_s`): the bound is moved from the number
    of tries, which shorter waits would use up in a fraction of that time
    (500 tries of 0.2 s: 100 s, when a loaded SuperLink with 40 nodes took
    longer to hand a node its weights), to the time itself. Checked first
    (`check_object_pull`).
    """
    module = importlib.import_module(module_name)
    flower = check_object_pull(module, name, caller)
    binding = functools.partial(
        flower,
        initial_backoff=min(first_s, cap_s),
        backoff_cap=cap_s,
        max_tries_per_object=None,
        max_time=flower_pull_patience_s(),
    )
    setattr(module, name, binding)


def _changed(module: ModuleType, what: str) -> FlowerStructureError:
    return FlowerStructureError(
        f"the installed Flower's {module.__name__} is not what consortia shortens its waits "
        f"in: {what}. Install the Flower version consortia pins (pip install consortia), or "
        "update consortia/common/flower_waits.py for this Flower"
    )


def _is_time(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id == "time"


def _sleep_calls(tree: ast.AST) -> list[tuple[int, object]]:
    """(line, constant argument or None) of every `time.sleep(...)` call under `tree`."""
    calls: list[tuple[int, object]] = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and _is_time(node.func.value)
        ):
            argument = node.args[0] if len(node.args) == 1 and not node.keywords else None
            value = argument.value if isinstance(argument, ast.Constant) else None
            calls.append((node.lineno, value))
    return calls


def _function(tree: ast.Module, function: Callable[..., Any]) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == function.__name__:
            return node
    return ast.Module(body=[], type_ignores=[])
