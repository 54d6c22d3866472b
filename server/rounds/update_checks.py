"""How far a node's update may move the model: an L2 bound on ‖local − global‖, per reply.

Screening (strategies.py) already drops replies whose arrays have other
names, shapes or dtypes than the global model. This module adds the checks
on the values: every entry finite, and the update's L2 norm over all arrays
within a bound. A node that sends NaN, a broken model, or a naively scaled
("boosted") update is dropped with the norm and the bound in the reason.

The bound is `update_checks.max_update_norm` when set. Otherwise it is
derived per reply from the job (learning rate, momentum or Adam, clipping
norm C, batch size, FedProx' μ), the model size d, and what the node reports
(noise multiplier σ, sample rate q, steps T), times `norm_slack`:

DP-SGD with SGD (momentum m ≥ 0). Each of the T steps is
    g_t = (S_t + z_t) / B,   ‖S_t‖ ≤ C·|batch_t|,   z_t ~ N(0, σ²C²·I_d),
with B Opacus' expected batch size (the divisor of its "mean" reduction) and
|batch_t| the Poisson batch: each of the node's n records joins independently
with probability q. PyTorch's SGD keeps v_t = m·v_{t−1} + g_t and steps by
−lr·v_t; FedProx then applies w ← w − a·(w − w_global), a = lr·μ_prox, after
each step. So the distance to the global model evolves as
e_{t+1} = (1 − a)(e_t − lr·v_t), and the round's update is
Δ = −lr·Σ_s c_s·g_s with fixed weights
    c_s = Σ_{t=s..T} (1 − a)^(T−t+1)·m^(t−s)
(c_s = (1 − m^(T−s+1))/(1 − m) ≤ 1/(1 − m) without FedProx, all 1 without
momentum either; the proximal step only shrinks them while a ≤ 2, and the
bound uses |c_s| whatever a is). Split into the two parts:
- clipped sums: ‖Σ c_s S_s‖ ≤ C·Σ |c_s|·|batch_s|, a weighted sum of T·n
  independent Bernoulli(q) with mean n·q·Σ|c_s| < (B + 1)·Σ|c_s| (B is at
  least ⌈n·q⌉ − 1), variance below (B + 1)·Σc_s² and summands at most
  c_max = max|c_s|, so Bernstein's inequality gives
      Σ |c_s|·|batch_s| ≤ (B + 1)Σ|c_s| + √(2(B + 1)Σc_s²·L) + 2·c_max·L/3
  except with probability e^(−L);
- noise: Σ c_s z_s is one Gaussian vector, N(0, σ²C²·Σc_s²·I_d), so its
  norm is at most σC·√(Σc_s²)·(√d + √(2L)) except with probability e^(−L)
  (Gaussian concentration of a 1-Lipschitz function:
  P(‖z‖ ≥ E‖z‖ + t) ≤ e^(−t²/2), and E‖z‖ ≤ √d). Summing the noise first is
  what makes this √T rather than T times one step's noise: the steps'
  noise draws are independent of each other and of the weights.
Hence, with L = ln(1/TAIL_PROBABILITY) (each tail ≤ 1e-9 per reply):
    ‖Δ‖ ≤ lr·C/B · [ Σ |c_s|·|batch_s| + σ·√(Σc_s²)·(√d + √(2L)) ].
With q = 1 (a node whose data fits in one batch) every record is in every
batch and B = n, so the first term is exactly B·Σ|c_s|. Without momentum
and FedProx Σc_s = Σc_s² = T: roughly lr·C·(T + σ√T·(√d + 6.4)/B).

B is not reported. The coordinator knows q = 1/k with k = ⌈n / batch_size⌉,
so n > (k − 1)·batch_size and B ≥ ⌈((k − 1)·batch_size + 1)/k⌉ − 1 (the −1:
Opacus' int(n·q) can round an exact quotient down). For q = 1 that says only
n ≥ 1: such a node's B is its record count, and the bound uses
`update_checks.min_node_records` (default 1: sound, but loose by up to the
node's record count in the noise term; set it to the consortium's minimum
dataset size to tighten it). Every term decreases in B, so the smallest
possible B gives a bound valid for every n consistent with q.

Adam (torch defaults β₁ = 0.9, β₂ = 0.999, as client/training.py builds it,
a fresh optimiser per round). Each coordinate moves by lr·m̂_t/(√v̂_t + ε) per
step, and by Cauchy–Schwarz
    |m̂_t / √v̂_t| ≤ r_t = √(1 − β₂^t)/(1 − β₁^t) · (1 − β₁)/√(1 − β₂) · √(Σ_{j<t} (β₁²/β₂)^j),
1 at t = 1 and about 7.3 for large t, whatever the gradients. So
    ‖Δ‖ ≤ lr·√d·Σ_{t≤T} |1 − a|^(T−t+1)·r_t   (a = lr·μ_prox as above),
with or without DP: Adam jobs get a derived bound even with privacy off.
(The often quoted lr·(1 − β₁)/√(1 − β₂) is a typical-case figure, not a
bound.)

Plain SGD without DP has no clipping: only `max_update_norm` bounds it.

Float rounding: each step's few float operations can each be off by half an
ulp of the weights; T·eps·(‖w_global‖ + bound) is added for them (eps of the
model's widest float type), which matters only for tiny bounds on large
weights. `norm_slack` (default 1.5) covers what the model leaves out.

What the bound does not stop: T, σ and q are reported by the node, so a node
that lies about them loosens its own bound. The norm check catches broken
and naively scaled updates; the robust aggregators (median, trimmed mean,
Krum) are the defence against nodes that craft updates within it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from flwr.app import ArrayRecord, MetricRecord

from consortia.common import protocol as p
from consortia.common.config import FedProxConfig, JobConfig
from consortia.server.rounds.aggregation import array_view

TAIL_PROBABILITY = 1e-9
"""Per reply and per tail (records drawn, noise norm): the chance an honest update exceeds."""

ADAM_BETAS = (0.9, 0.999)
"""torch.optim.Adam's default betas, which client/training.py uses (a test pins them)."""

NON_FINITE = "update holds NaN or infinite values"

_LOG_TAIL = math.log(1.0 / TAIL_PROBABILITY)
_CHUNK = 1 << 16  # elements per float64 scratch block: 512 KiB, stays in cache


# ----------------------------------------------------------------- the model


@dataclass(frozen=True)
class ReferenceModel:
    """The global model a round's updates are measured against (zero-copy views)."""

    views: dict[str, np.ndarray]
    dim: int
    norm: float
    float_eps: float

    @classmethod
    def of(cls, arrays: ArrayRecord) -> ReferenceModel:
        views = {key: array_view(array) for key, array in arrays.items()}
        floats = [v.dtype for v in views.values() if np.issubdtype(v.dtype, np.floating)]
        return cls(
            views=views,
            dim=sum(v.size for v in views.values()),
            norm=math.sqrt(sum(_squared_distance(v, None) for v in views.values())),
            float_eps=max((float(np.finfo(dtype).eps) for dtype in floats), default=0.0),
        )


def update_norm(arrays: ArrayRecord, reference: ReferenceModel) -> float:
    """‖local − global‖₂ over every array, accumulated in float64; NaN/inf if any entry is.

    Each array's payload is read in place (`array_view`) and differenced in
    small float64 blocks, so the cost is one pass over the update and a fixed
    512 KiB of scratch, whatever the model size.
    """
    total = 0.0
    for key, base in reference.views.items():
        total += _squared_distance(array_view(arrays[key]), base)
    return math.sqrt(total)


def _squared_distance(local: np.ndarray, base: np.ndarray | None) -> float:
    """Σ (local − base)² in float64 (Σ local² when `base` is None), block by block."""
    flat = local.reshape(-1)
    flat_base = None if base is None else base.reshape(-1)
    scratch = np.empty(min(_CHUNK, flat.size), np.float64)
    total = 0.0
    for start in range(0, flat.size, _CHUNK):
        stop = min(start + _CHUNK, flat.size)
        block = scratch[: stop - start]
        if flat_base is None:
            block[...] = flat[start:stop]
        else:
            np.subtract(flat[start:stop], flat_base[start:stop], out=block, dtype=np.float64)
        total += float(np.dot(block, block))
    return total


def all_finite(arrays: ArrayRecord) -> bool:
    """Whether every entry of every array is finite (no NaN, no ±inf)."""
    return all(np.isfinite(array_view(array)).all() for array in arrays.values())


# ----------------------------------------------------------------- the bound


@dataclass(frozen=True)
class NormBound:
    """An upper bound on ‖local − global‖₂, with where it comes from (for the reason)."""

    value: float
    basis: str


def min_expected_batch(sample_rate: float, batch_size: int, min_node_records: int) -> int:
    """The smallest expected batch B (Opacus' divisor) a node with this sample rate can have.

    q = 1/k with k = ⌈n / batch_size⌉ gives n ≥ (k − 1)·batch_size + 1, and
    Opacus' B = int(n·q) ≥ ⌈n/k⌉ − 1. With k = 1, B = n exactly, known only
    to be at least `min_node_records` (capped at batch_size: n ≤ batch_size).
    """
    batches = max(1, math.floor(1.0 / sample_rate + 1e-9))
    if batches == 1:
        return max(1, min(min_node_records, batch_size))
    fewest = max((batches - 1) * batch_size + 1, min_node_records)
    return max(1, math.ceil(fewest / batches) - 1)


def dp_sgd_bound(
    *,
    learning_rate: float,
    max_grad_norm: float,
    noise_multiplier: float,
    steps: int,
    sample_rate: float,
    expected_batch: int,
    dim: int,
    momentum: float = 0.0,
    proximal_mu: float = 0.0,
) -> float:
    """lr·C/B·[Σ|c_s|·|batch_s| + σ·√(Σc_s²)·(√d + √(2L))]; the module docstring derives it."""
    b = float(expected_batch)
    shrink = abs(1.0 - learning_rate * proximal_mu)
    total, squares, largest = _step_weights(steps, momentum, shrink)
    if sample_rate >= 1.0:
        drawn = b * total  # every record in every batch, and B = n
    else:
        drawn = (
            (b + 1.0) * total
            + math.sqrt(2.0 * (b + 1.0) * squares * _LOG_TAIL)
            + 2.0 * largest * _LOG_TAIL / 3.0
        )
    noise = noise_multiplier * math.sqrt(squares) * (math.sqrt(dim) + math.sqrt(2 * _LOG_TAIL))
    return learning_rate * max_grad_norm / b * (drawn + noise)


def adam_bound(*, learning_rate: float, steps: int, dim: int, proximal_mu: float = 0.0) -> float:
    """lr·√d·Σ_t |1 − a|^(T−t+1)·r_t: Adam's steps are bounded whatever the gradients."""
    shrink = abs(1.0 - learning_rate * proximal_mu)
    return learning_rate * math.sqrt(dim) * _adam_ratio_sum(steps, shrink)


_MAX_LOG = 700.0  # beyond e^700 (FedProx with lr·μ far above 2) the bound is moot: infinite


@lru_cache(maxsize=256)
def _step_weights(steps: int, momentum: float, shrink: float) -> tuple[float, float, float]:
    """(Σ|c_s|, Σc_s², max|c_s|) of c_s = Σ_{t=s..T} shrink^(T−t+1)·m^(t−s), s = 1..T.

    With K = T − s + 1 the weights follow C_K = m·C_{K−1} + shrink^K.
    """
    if steps <= 0:
        return 0.0, 0.0, 0.0
    if shrink > 1.0 and steps * math.log(shrink) > _MAX_LOG:
        return math.inf, math.inf, math.inf
    weights = np.empty(steps)
    current, power = 0.0, 1.0
    for k in range(steps):
        power *= shrink
        current = momentum * current + power
        weights[k] = current
    return float(weights.sum()), float(np.dot(weights, weights)), float(weights.max())


@lru_cache(maxsize=256)
def _adam_ratio_sum(steps: int, shrink: float = 1.0) -> float:
    """Σ_{t=1}^{T} shrink^(T−t+1)·r_t for torch's default betas (see the module docstring)."""
    if steps <= 0:
        return 0.0
    if shrink > 1.0 and steps * math.log(shrink) > _MAX_LOG:
        return math.inf
    beta_1, beta_2 = ADAM_BETAS
    t = np.arange(1, steps + 1, dtype=np.float64)
    rho = beta_1**2 / beta_2
    geometric = (1.0 - rho**t) / (1.0 - rho)  # Σ_{j<t} ρ^j
    ratio = (
        np.sqrt(1.0 - beta_2**t)
        / (1.0 - beta_1**t)
        * (1.0 - beta_1)
        / math.sqrt(1.0 - beta_2)
        * np.sqrt(geometric)
    )
    return float(np.dot(ratio, shrink ** (steps - t + 1.0)))


# ------------------------------------------------------------------ checks


class UpdateChecks:
    """The per-reply value checks a job asks for: finiteness and the norm bound.

    Built once per job; `problem` is called per reply with the round's
    reference model. Without a job (a strategy built by hand, not by
    `build_strategy`) nothing is known to derive a bound from: only
    finiteness is checked.
    """

    def __init__(self, job: JobConfig | None = None) -> None:
        self.job = job or JobConfig()
        self.config = self.job.update_checks
        self._adam = job is not None and job.training.optimizer == "adam"
        self._dp = job is not None and job.privacy.enabled
        strategy = self.job.strategy
        self._proximal_mu = strategy.proximal_mu if isinstance(strategy, FedProxConfig) else 0.0

    @property
    def min_updates(self) -> int:
        return self.config.min_updates

    @property
    def bounds_norm(self) -> bool:
        """Whether every reply's norm is computed (which also catches NaN and ∞ in it)."""
        return self.config.max_update_norm is not None or self._dp or self._adam

    def problem(
        self, arrays: ArrayRecord, metrics: MetricRecord, reference: ReferenceModel, *, scan: bool
    ) -> str | None:
        """Why the update cannot be used, or None.

        Names, shapes and dtypes must already match `reference`. Without a
        norm bound the values are scanned for NaN/∞ only if `scan` (averaging
        strategies check their average instead, see strategies.py).
        """
        bound = self.bound(metrics, reference)
        if isinstance(bound, str):
            return bound
        if bound is None:
            return None if not scan or all_finite(arrays) else NON_FINITE
        norm = update_norm(arrays, reference)
        if not math.isfinite(norm) and not all_finite(arrays):
            return NON_FINITE
        if not norm <= bound.value:
            return f"update norm {norm:.4g} exceeds the bound {bound.value:.4g} ({bound.basis})"
        return None

    def bound(self, metrics: MetricRecord, reference: ReferenceModel) -> NormBound | str | None:
        """The reply's norm bound; a str says why the reply cannot be bounded; None: no bound."""
        explicit = self.config.max_update_norm
        if explicit is not None:
            return NormBound(explicit, f"update_checks.max_update_norm {explicit:g}")
        if not (self._dp or self._adam):
            return None
        steps = metrics.get(p.STEPS)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            return (
                f"reply lacks a valid '{p.STEPS}' count (needed to bound the update), got {steps!r}"
            )
        lr = self.job.training.learning_rate
        if self._adam:
            value = adam_bound(
                learning_rate=lr, steps=steps, dim=reference.dim, proximal_mu=self._proximal_mu
            )
            basis = f"Adam: lr {lr:g} × √d, d {reference.dim}, {steps} steps"
        else:
            dp = self._dp_terms(metrics)
            if isinstance(dp, str):
                return dp
            sigma, rate = dp
            clip = self.job.privacy.max_grad_norm
            batch = min_expected_batch(
                rate, self.job.training.batch_size, self.config.min_node_records
            )
            momentum = self.job.training.momentum
            value = dp_sgd_bound(
                learning_rate=lr,
                max_grad_norm=clip,
                noise_multiplier=sigma,
                steps=steps,
                sample_rate=rate,
                expected_batch=batch,
                dim=reference.dim,
                momentum=momentum,
                proximal_mu=self._proximal_mu,
            )
            basis = (
                f"lr {lr:g} × C {clip:g}, {steps} steps, σ {sigma:.4g}, q {rate:.4g}, "
                f"expected batch ≥ {batch}, d {reference.dim}"
                + (f", momentum {momentum:g}" if momentum else "")
            )
        if self._proximal_mu:
            basis += f", FedProx μ {self._proximal_mu:g}"
        value += steps * reference.float_eps * (reference.norm + value)
        slack = self.config.norm_slack
        return NormBound(value * slack, f"derived from {basis}; × slack {slack:g}")

    @staticmethod
    def _dp_terms(metrics: MetricRecord) -> tuple[float, float] | str:
        """(σ, q) as the node reported them, or why they are unusable."""
        sigma, rate = metrics.get(p.NOISE_MULTIPLIER), metrics.get(p.SAMPLE_RATE)
        if not isinstance(sigma, int | float) or not math.isfinite(sigma) or sigma < 0:
            return (
                f"reply lacks a valid '{p.NOISE_MULTIPLIER}' (needed to bound the update), "
                f"got {sigma!r}"
            )
        if not isinstance(rate, int | float) or not 0 < rate <= 1:
            return (
                f"reply lacks a valid '{p.SAMPLE_RATE}' (needed to bound the update), got {rate!r}"
            )
        return float(sigma), float(rate)
