"""A strategy's state between rounds, as arrays: what a checkpoint must hold to resume it.

FedAvg and FedProx keep nothing between rounds. Flower's FedOpt family
(FedAdam, FedYogi, FedAdagrad) keeps the server optimiser's moments `m_t`
and `v_t`, plus `current_arrays`, the global model as sent in the last
`configure_train` (overwritten before its next use, kept for a complete
snapshot). They are plain attributes (`dict[str, ndarray]`), read and
written here so that the strategies module stays Flower's logic plus
consortia's duties.
"""

from __future__ import annotations

import numpy as np
from flwr.serverapp.strategy import Strategy

from consortia.common.errors import FederationError

STATE_ATTRIBUTES = ("current_arrays", "m_t", "v_t")

StrategyState = dict[str, dict[str, np.ndarray]]


def capture_strategy_state(strategy: Strategy) -> StrategyState:
    """Copies of the strategy's array-valued state attributes that are set."""
    state: StrategyState = {}
    for attribute in STATE_ATTRIBUTES:
        value = getattr(strategy, attribute, None)
        if isinstance(value, dict) and value:
            state[attribute] = {key: np.array(array, copy=True) for key, array in value.items()}
    return state


def restore_strategy_state(
    strategy: Strategy, state: StrategyState, key_order: list[str] | None = None
) -> None:
    """Put `state` back; the checkpoint and the job's strategy must agree on what exists.

    `key_order` (the model's array names) restores each dict in the order
    the interrupted run built it, so iteration over it is the same too.
    """
    name = type(strategy).__name__
    for attribute in STATE_ATTRIBUTES:
        if attribute in state and not hasattr(strategy, attribute):
            raise FederationError(
                f"the checkpoint holds strategy state '{attribute}' that the job's strategy "
                f"{name} does not keep; the checkpoint belongs to another strategy"
            )
    for attribute, arrays in state.items():
        if attribute not in STATE_ATTRIBUTES:
            raise FederationError(f"the checkpoint holds unknown strategy state '{attribute}'")
        known = [key for key in key_order or [] if key in arrays]
        order = known + sorted(set(arrays) - set(known))
        setattr(strategy, attribute, {key: arrays[key] for key in order})
