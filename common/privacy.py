"""consortia's one privacy accountant: DP events in, composed state and ε out.

Every ε consortia states is composed here, nowhere else: a node's durable
ledger (client/ledger.py) stores the state this module composes and loads it
back, a simulated node composes the history kept in its Flower Context,
`consortia node check-job` projects with it, and noise calibration searches
with it. The shape is dp-accounting's (a `DpEvent` composed into a
`PrivacyAccountant`, then `get_epsilon`) and Opacus' `accountants/`: a
release (`Release`) and the mechanism that made it (`Mechanism`) go in
through `PrivacyAccountant.compose`; `epsilon(δ)` comes out. The composed
state (`RdpAccountant.composed`, `PrvAccountant.history`) is apart from the
math, so a ledger can store it and load it back into an accountant.

All numbers come from Opacus' accountants. What this module adds is
bookkeeping that stays cheap over long histories: RDP composes additively
per order, so the RDP curve of one (noise multiplier, sample rate) step is
computed once and scaled by the step count, instead of re-running Opacus'
`get_epsilon` (0.1-0.3 s a call) every round. The result is bit-for-bit the
value Opacus' `RDPAccountant` returns for the same history (tested). PRV has
no additive shortcut: its state is the history, merged per (σ, q), and ε is
Opacus' `PRVAccountant` over it.
"""

from __future__ import annotations

import importlib
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from enum import StrEnum
from functools import lru_cache
from types import ModuleType
from typing import TYPE_CHECKING, Literal, assert_never

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from consortia.common.errors import PrivacyError

if TYPE_CHECKING:
    from opacus.accountants import PRVAccountant, RDPAccountant

AccountantName = Literal["rdp", "prv"]
# Opacus' `RDPAccountant.DEFAULT_ALPHAS`, written out (tests/test_privacy.py
# checks they are equal): importing Opacus imports torch, ~250 MiB and seconds
# that a process which only stores or reads a ledger (`consortia node start`
# supervising its SuperNode, `node ledger` commands) should not pay. Opacus is
# imported where ε is computed.
RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))


def _rdp_analysis() -> ModuleType:
    return importlib.import_module("opacus.accountants.analysis.rdp")


def _opacus_accountant(name: AccountantName) -> RDPAccountant | PRVAccountant:
    from opacus.accountants import PRVAccountant, RDPAccountant

    return RDPAccountant() if name == "rdp" else PRVAccountant()


_ORDER_LIST: list[float] = list(RDP_ORDERS)


class Release(BaseModel):
    """One DP release: `steps` noisy steps at one noise multiplier and sample rate."""

    model_config = ConfigDict(frozen=True)

    noise_multiplier: float = Field(gt=0)
    sample_rate: float = Field(gt=0, le=1)
    steps: int = Field(ge=0)


class Mechanism(StrEnum):
    """What made a release; the accountants dispatch on it (`accounted_as`).

    A new mechanism (distributed DP, say) is added here: a member, and its
    case in `accounted_as`. Nothing else composes ε.
    """

    DPSGD = "dpsgd"
    """Poisson-subsampled DP-SGD steps."""
    GAUSSIAN = "gaussian"
    """A Gaussian mechanism on a statistic (σ relative to its L2 sensitivity;
    usually q = 1, one step)."""

    def accounted_as(self, release: Release) -> Release:
        """The subsampled-Gaussian steps a release of this mechanism is composed as.

        Both mechanisms today are exactly that (the Gaussian mechanism is the
        subsampled Gaussian at q = 1), which RDP and PRV account exactly.
        """
        match self:
            case Mechanism.DPSGD | Mechanism.GAUSSIAN:
                return release
            case _:
                assert_never(self)


def histogram_release(noise_multiplier: float) -> Release:
    """A counting query with L2 sensitivity 1 under Gaussian noise of std `noise_multiplier`.

    The Gaussian mechanism is the subsampled Gaussian at sample rate 1 for one
    step, so it composes with DP-SGD releases in the same accountant.
    """
    return Release(noise_multiplier=noise_multiplier, sample_rate=1.0, steps=1)


# ------------------------------------------------------------------ the accountant

StepCurves = Callable[[float, float], np.ndarray]
"""(σ, q) → RDP of one subsampled-Gaussian step at every order of `RDP_ORDERS`."""


@lru_cache(maxsize=256)
def rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP of one subsampled-Gaussian step at every order of `RDP_ORDERS` (cached, read-only).

    RDP composes additively per order: a history's curve is the sum of
    `steps * rdp_per_step(σ, q)` over its releases.
    """
    curve: np.ndarray = _rdp_analysis().compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=_ORDER_LIST
    )
    curve.setflags(write=False)
    return curve


class PrivacyAccountant(ABC):
    """Composes releases one at a time, never forgetting one; ε of everything composed.

    There is no reset: a history's ε only grows. `copy()` gives an independent
    accountant to project a release on without composing it here.
    """

    @abstractmethod
    def compose(self, release: Release, mechanism: Mechanism = Mechanism.DPSGD) -> None:
        """Add `release`, made by `mechanism`, to the composition."""

    @abstractmethod
    def epsilon(self, delta: float) -> float:
        """ε of everything composed so far, at `delta` (0 when nothing was)."""

    @abstractmethod
    def copy(self) -> PrivacyAccountant:
        """An accountant with the same composed state, composing independently from now on."""

    def projected(
        self, release: Release, delta: float, mechanism: Mechanism = Mechanism.DPSGD
    ) -> float:
        """ε at `delta` if `release` were composed too; this accountant is left as it was."""
        projection = self.copy()
        projection.compose(release, mechanism)
        return projection.epsilon(delta)


class RdpAccountant(PrivacyAccountant):
    """RDP: the state is one vector, the RDP of the composition at every order of `RDP_ORDERS`.

    `composed` starts at the given vector (a ledger's stored state) or at
    zero. `curves` says where one step's curve comes from: Opacus, cached in
    this process, by default; a ledger passes its file's cache.
    """

    def __init__(
        self, composed: np.ndarray | None = None, curves: StepCurves = rdp_per_step
    ) -> None:
        vector = np.zeros(len(RDP_ORDERS)) if composed is None else np.array(composed, np.float64)
        if vector.shape != (len(RDP_ORDERS),):
            raise ValueError(f"an RDP state has {len(RDP_ORDERS)} orders, got {vector.shape}")
        self._composed = _read_only(vector)
        self._curves = curves

    @property
    def composed(self) -> np.ndarray:
        """The composed RDP vector (float64 over `RDP_ORDERS`); the state to store."""
        return self._composed

    def compose(self, release: Release, mechanism: Mechanism = Mechanism.DPSGD) -> None:
        step = mechanism.accounted_as(release)
        if step.steps:  # zero steps release nothing (and 0 × an infinite order is NaN)
            curve = self._curves(step.noise_multiplier, step.sample_rate)
            self._composed = _read_only(self._composed + step.steps * curve)

    def epsilon(self, delta: float) -> float:
        if not self._composed.any():
            return 0.0
        eps, _ = _rdp_analysis().get_privacy_spent(
            orders=_ORDER_LIST, rdp=self._composed, delta=delta
        )
        return float(eps)

    def copy(self) -> RdpAccountant:
        return RdpAccountant(self._composed, self._curves)


class PrvAccountant(PrivacyAccountant):
    """PRV: the state is the history, one release per (σ, q) in first-use order.

    Composition is commutative, and without the merge Opacus recomputes a
    PRV for every release of a long history (seconds a round in a PRV
    simulation). ε is Opacus' `PRVAccountant` over the merged history.
    """

    def __init__(self, history: Iterable[Release] = ()) -> None:
        self._steps: dict[tuple[float, float], int] = {}
        for release in history:
            self.compose(release)

    @property
    def history(self) -> list[Release]:
        """The merged history (zero-step releases dropped); the state to store."""
        return [
            Release(noise_multiplier=sigma, sample_rate=q, steps=steps)
            for (sigma, q), steps in self._steps.items()
        ]

    def compose(self, release: Release, mechanism: Mechanism = Mechanism.DPSGD) -> None:
        step = mechanism.accounted_as(release)
        if step.steps:
            key = (step.noise_multiplier, step.sample_rate)
            self._steps[key] = self._steps.get(key, 0) + step.steps

    def epsilon(self, delta: float) -> float:
        if not self._steps:
            return 0.0
        accountant = _opacus_accountant("prv")
        accountant.history = [(sigma, q, steps) for (sigma, q), steps in self._steps.items()]
        return float(accountant.get_epsilon(delta=delta))

    def copy(self) -> PrvAccountant:
        twin = PrvAccountant()
        twin._steps = dict(self._steps)
        return twin


def _read_only(vector: np.ndarray) -> np.ndarray:
    """A composed state is replaced, never written in place: copies may share it."""
    vector.setflags(write=False)
    return vector


def new_accountant(accountant: AccountantName) -> PrivacyAccountant:
    """An empty accountant of the named kind."""
    if accountant == "rdp":
        return RdpAccountant()
    return PrvAccountant()


def epsilon(history: Iterable[Release], delta: float, accountant: AccountantName = "rdp") -> float:
    """ε after composing the whole `history` (DP-SGD releases) at `delta`; 0 if it is empty."""
    composed = new_accountant(accountant)
    for release in history:
        composed.compose(release)
    return composed.epsilon(delta)


def opacus_epsilon(history: list[Release], delta: float, accountant: AccountantName) -> float:
    """The same ε through Opacus' own accountant objects (reference for tests and audits).

    Releases of one (σ, q) are merged first, as `PrvAccountant` does: without
    it Opacus recomputes an RDP curve or a PRV for every release of a long
    history.
    """
    merged = PrvAccountant(history).history
    if not merged:
        return 0.0
    reference = _opacus_accountant(accountant)
    reference.history = [(r.noise_multiplier, r.sample_rate, r.steps) for r in merged]
    return float(reference.get_epsilon(delta=delta))


def rdp_epsilon_floor(delta: float) -> float:
    """The least ε the RDP accountant can state at `delta`, however much noise (closed form).

    Opacus converts RDP to (ε, δ) as min over orders α of
    rdp(α) + log(1/δ)/(α-1) - log(α)/(α-1) + log((α-1)/α); with rdp ≥ 0,
    ε never drops below that minimum at rdp = 0, bounded by the largest order
    (63): about 0.103 at δ = 1e-5. A target below it is unreachable.
    """
    with warnings.catch_warnings():
        # Opacus warns that the largest order is optimal: at rdp = 0 it always is.
        warnings.filterwarnings("ignore", "Optimal order is the largest alpha")
        eps, _ = _rdp_analysis().get_privacy_spent(
            orders=_ORDER_LIST, rdp=np.zeros(len(RDP_ORDERS)), delta=delta
        )
    return float(eps)


# ------------------------------------------------------------------ calibration

SIGMA_MAX = 2000.0
"""The most noise calibration will choose. A step at σ = 2000 adds noise 2000
times the clipping norm to each summed gradient: nothing learns under it, and
ε is by then within a hair of what any noise can reach (RDP: within 1e-4 of
`rdp_epsilon_floor`). The cap also bounds the search's cost: Opacus' RDP of a
subsampled step slows down as σ grows (0.6 s at σ = 20, 2 s at 2000, 8 s at
1.3e6; PRV 2-8 s at 2000), and Opacus' own search climbs to σ = 1e6."""
EPSILON_TOLERANCE = 0.01
"""Calibration stops when the ε it returns is within this of the target (Opacus' default)."""
_MAX_BISECTIONS = 60
"""Halvings of the bracket at most (it is then under 2000 / 2^60 wide: floats' resolution)."""


class UnreachableTargetError(PrivacyError):
    """No noise up to `SIGMA_MAX` keeps ε within the target.

    `smallest_epsilon` is the least ε reachable with at most that noise
    (or the accountant's floor), when it is known.
    """

    def __init__(self, message: str, smallest_epsilon: float | None) -> None:
        super().__init__(message)
        self.smallest_epsilon = smallest_epsilon


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: AccountantName = "rdp",
    prior: Sequence[Release] = (),
) -> float:
    """Smallest noise multiplier (to `EPSILON_TOLERANCE`) whose ε after `steps` is ≤ target.

    `prior` are releases the job makes besides DP-SGD (a label histogram):
    the target covers them too. The search is Opacus' `get_noise_multiplier`
    (σ doubled from 20 until ε ≤ target, then bisected on [0, σ]), so without
    `prior` it returns the very σ Opacus does, whose ε never exceeds the
    target, but bounded: `check_reachable` first refuses a target no σ up
    to `SIGMA_MAX` meets (closed-form checks; when σ = 20 is not enough, at
    most one evaluation at the cap), and σ never climbs past the cap. Raises
    `UnreachableTargetError` naming the smallest reachable ε.

    Memoized: the search costs 0.1-0.5 s, and in a simulation every virtual
    node of one size asks the same question (1,000 nodes, 1,000 searches).
    The result is a pure function of the arguments, so a cached answer is
    the answer.
    """
    return _calibrate(target_epsilon, delta, sample_rate, steps, accountant, tuple(prior))


def check_reachable(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: AccountantName = "rdp",
    prior: Sequence[Release] = (),
) -> None:
    """Raise `UnreachableTargetError` if no σ ≤ `SIGMA_MAX` meets the target; cheap otherwise.

    In order, stopping at the first that decides: the prior releases' own
    ε, the RDP accountant's floor (closed form), an upper bound on ε at the
    cap (the same steps at sample rate 1: subsampling only lowers ε; closed
    form for RDP, milliseconds for PRV), and only if that bound misses the
    target, ε at the cap itself (one evaluation, 2-8 s at q < 1).
    """
    problem = _Problem(target_epsilon, delta, sample_rate, steps, accountant, tuple(prior))
    problem.check_prior_and_floor()
    problem.check_cap()


@lru_cache(maxsize=1024)
def _calibrate(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: AccountantName,
    prior: tuple[Release, ...],
) -> float:
    problem = _Problem(target_epsilon, delta, sample_rate, steps, accountant, prior)
    problem.check_prior_and_floor()
    return problem.search()


class _Problem:
    """One calibration: ε as a function of σ over `prior` and the job's steps."""

    def __init__(
        self,
        target: float,
        delta: float,
        sample_rate: float,
        steps: int,
        accountant: AccountantName,
        prior: tuple[Release, ...],
    ) -> None:
        self.target, self.delta = target, delta
        self.sample_rate, self.steps = sample_rate, steps
        self.accountant = accountant
        self.before = new_accountant(accountant)
        for release in prior:
            self.before.compose(release)

    def epsilon_at(self, sigma: float, sample_rate: float | None = None) -> float:
        """ε of the prior plus the job's steps at noise `sigma` (the one evaluation)."""
        rate = self.sample_rate if sample_rate is None else sample_rate
        release = Release(noise_multiplier=sigma, sample_rate=rate, steps=self.steps)
        with warnings.catch_warnings():
            # At large σ Opacus warns that its largest order is optimal: expected
            # while searching, and the orders are fixed (ledgers store them).
            warnings.filterwarnings("ignore", "Optimal order is the largest alpha")
            return self.before.projected(release, self.delta)

    def check_prior_and_floor(self) -> None:
        """The checks that need no evaluation of the job's steps."""
        spent_before = self.before.epsilon(self.delta)
        if spent_before >= self.target:
            raise self.unreachable(
                f"the job's other releases alone spend ε={spent_before:.4g}",
                "raise the target ε, or add more noise to the other releases",
                None,
            )
        if self.accountant == "rdp":
            floor = rdp_epsilon_floor(self.delta)
            if self.target <= floor:
                raise self.unreachable(
                    f"no noise brings its ε below {floor:.4g} at δ={self.delta:g} (its "
                    "largest RDP order, 63, bounds it)",
                    f"raise the target ε above {floor:.4g}, or account with PRV "
                    '(accountant = "prv"), which is tighter at small ε',
                    floor,
                )

    def check_cap(self) -> None:
        """Is the target met at `SIGMA_MAX`? A bound first, one evaluation if it misses."""
        if self.sample_rate < 1.0 and self.epsilon_at(SIGMA_MAX, 1.0) <= self.target:
            return  # subsampling only lowers ε: met at the cap
        at_cap = self.epsilon_at(SIGMA_MAX)
        if at_cap > self.target:
            raise self.cap_reached(at_cap)

    def search(self) -> float:
        """Opacus' search, capped: double σ from 20 until ε ≤ target, then bisect on [0, σ].

        When σ = 20 misses the target, `check_cap` runs before σ climbs
        further: an unreachable target then costs one evaluation at the cap,
        not the seven doublings up to it.
        """
        low, high = 0.0, 20.0
        eps_high = self.epsilon_at(high)
        if eps_high > self.target:
            self.check_cap()
        while eps_high > self.target:
            if high >= SIGMA_MAX:  # only if ε is not monotone in σ (PRV's numerics)
                raise self.cap_reached(eps_high)
            high = min(2 * high, SIGMA_MAX)
            eps_high = self.epsilon_at(high)
        for _ in range(_MAX_BISECTIONS):
            if self.target - eps_high <= EPSILON_TOLERANCE:
                break
            middle = (low + high) / 2
            eps_middle = self.epsilon_at(middle)
            if eps_middle < self.target:
                high, eps_high = middle, eps_middle
            else:
                low = middle
        return high

    def cap_reached(self, at_cap: float) -> UnreachableTargetError:
        return self.unreachable(
            f"the smallest ε reachable is {at_cap:.4g}, at σ={SIGMA_MAX:g}, the most noise "
            "consortia calibrates",
            f"raise the target ε to at least {at_cap:.4g}, train fewer rounds or epochs, or "
            "use larger local datasets",
            at_cap,
        )

    def unreachable(self, reason: str, fix: str, smallest: float | None) -> UnreachableTargetError:
        return UnreachableTargetError(
            f"cannot reach ε={self.target:g} at δ={self.delta:g} over {self.steps} steps with "
            f"sample rate {self.sample_rate:.4g} ({self.accountant.upper()} accountant): "
            f"{reason}; {fix}",
            smallest,
        )
