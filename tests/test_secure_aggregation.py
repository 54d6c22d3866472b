"""SecAgg+: the primitives, and whole rounds between real node and coordinator code.

Rounds run through `secagg_loopback.LoopbackGrid` (in-process transport,
real protocol code on both sides). The deployment and simulation tests run
the same code through Flower (test_secure_deployment.py, test_simulation.py).
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from secagg_loopback import BOUND, Node, run_round, updates

from consortia.client import secure_aggregation as secagg
from consortia.common.config import JobConfig, SecureAggregationConfig
from consortia.common.secagg import crypto, graph, masks, shamir, wire
from consortia.common.secagg.fixed_point import EncodingRangeError, FixedPoint

pytestmark = pytest.mark.usefixtures("task_identity")

# --------------------------------------------------------------------- primitives


def test_any_threshold_shares_rebuild_the_secret_and_fewer_do_not() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, [3, 5, 8, 9, 11], threshold=3)
    for chosen in ([0, 1, 2], [4, 2, 0], [1, 3, 4]):
        assert shamir.combine([shares[i] for i in chosen], 3) == secret
    with pytest.raises(shamir.ShamirError, match="2 share"):
        shamir.combine(shares[:2], 3)
    # Two shares of a threshold-3 polynomial say nothing: read as threshold 2 they
    # interpolate a field element that is (with overwhelming probability) not a
    # 32-byte value at all, let alone the secret.
    with pytest.raises(shamir.ShamirError, match="do not belong to one 32-byte secret"):
        shamir.combine(shares[:2], 2)


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("n", [1, 2, 4, 5, 7, 8, 10, 99])
def test_fixed_point_sum_is_exact_at_the_extremes_and_never_wraps(bits: int, n: int) -> None:
    """n vectors at the very ends of the range (in 64-bit words R/step rounds up to
    M + 1 in float64 for many n: the integer clip must catch it, or the sum wraps)."""
    encoding = FixedPoint(bits=bits, bound=2.5, summands=n)  # type: ignore[arg-type]
    total = np.zeros(3, dtype=encoding.dtype)
    for _ in range(n):
        total += encoding.encode(np.array([2.5, -2.5, 0.0]))
    assert np.allclose(encoding.decode_sum(total), [2.5 * n, -2.5 * n, 0.0], rtol=1e-12)


@given(
    st.sampled_from([32, 64]),
    st.integers(1, 500),
    st.floats(1e-3, 1e3),
    st.integers(0, 2**32 - 1),
)
@settings(max_examples=60, deadline=None)
def test_fixed_point_error_is_within_half_a_step(
    bits: int, n: int, bound: float, seed: int
) -> None:
    encoding = FixedPoint(bits=bits, bound=bound, summands=n)  # type: ignore[arg-type]
    values = np.random.default_rng(seed).uniform(-bound, bound, (n, 16))
    total = np.zeros(16, dtype=encoding.dtype)
    for row in values:
        total += encoding.encode(row)
    error = np.abs(encoding.decode_sum(total) / n - values.mean(axis=0))
    assert error.max() <= encoding.mean_error_bound * (1 + 1e-9) + 1e-12 * bound


def test_a_value_outside_the_range_is_an_error_not_a_clip() -> None:
    encoding = FixedPoint(bits=32, bound=1.0, summands=4)
    with pytest.raises(EncodingRangeError, match=r"entry 2 = 1\.5"):
        encoding.encode(np.array([0.1, -1.0, 1.5]))
    with pytest.raises(EncodingRangeError, match="1 update value"):
        encoding.encode(np.array([math.nan, 0.0]))


def test_masks_are_chunked_keystreams_that_cancel() -> None:
    seed = bytes(32)
    size = masks.CHUNK * 2 + 5
    whole = np.zeros(size, np.uint32)
    masks.apply_masks(whole, [(seed, False)])
    assert np.frombuffer(whole.tobytes(), np.uint32)[: masks.CHUNK].any()
    vector = np.arange(size, dtype=np.uint32)
    masks.apply_masks(vector, [(seed, False)])
    assert np.array_equal(vector, np.arange(size, dtype=np.uint32) + whole)
    masks.apply_masks(vector, [(seed, True)])
    assert np.array_equal(vector, np.arange(size, dtype=np.uint32))


def test_pairwise_keys_agree_and_sealed_shares_open_only_for_their_addressee() -> None:
    a, b, c = (crypto.new_private_key() for _ in range(3))
    ka, kb, kc = (crypto.PrivateKey(x) for x in (a, b, c))
    ab = ka.agree(crypto.public_key(b), crypto.MASK_KEY, b"ctx")
    assert ab == kb.agree(crypto.public_key(a), crypto.MASK_KEY, b"ctx")
    assert ab != ka.agree(crypto.public_key(b), crypto.SHARE_KEY, b"ctx")
    key = ka.agree(crypto.public_key(b), crypto.SHARE_KEY, b"ctx")
    box = crypto.seal(key, b"share", b"ctx", 1, 2)
    assert crypto.open_sealed(key, box, b"ctx", 1, 2) == b"share"
    with pytest.raises(crypto.SealError):
        crypto.open_sealed(key, box, b"ctx", 1, 3)  # re-addressed by the coordinator
    other = kc.agree(crypto.public_key(b), crypto.SHARE_KEY, b"ctx")
    with pytest.raises(crypto.SealError):
        crypto.open_sealed(other, box, b"ctx", 1, 2)


@given(st.integers(2, 60), st.integers(1, 60), st.integers(0, 1000))
@settings(max_examples=60, deadline=None)
def test_the_graph_is_regular_and_symmetric(n: int, degree: int, seed: int) -> None:
    neighbours = graph.neighbours(range(n), degree, random.Random(seed))
    k = graph.effective_degree(degree, n)
    for node, near in neighbours.items():
        assert len(near) == k and node not in near
        assert all(node in neighbours[other] for other in near)


def test_default_degree_grows_with_log_n() -> None:
    assert [graph.default_degree(n) for n in (2, 5, 20, 100, 1000)] == [1, 4, 10, 14, 20]


def test_a_malformed_stage_payload_is_one_clear_error() -> None:
    with pytest.raises(wire.SecAggProtocolError, match="no known stage"):
        wire.read_stage(ConfigRecord({"stage": "reveal-all"}))
    record = wire.Unmask(survivors=[1], dropped=[]).to_record()
    record["survivors"] = "everyone"
    with pytest.raises(wire.SecAggProtocolError, match="stage 'unmask': malformed payload"):
        wire.read_stage(record)


def test_the_job_config_refuses_what_secure_aggregation_cannot_do() -> None:
    with pytest.raises(ValueError, match="needs every update in the clear"):
        JobConfig.model_validate({"secure_aggregation": {}, "strategy": {"name": "krum"}})
    with pytest.raises(ValueError, match=r"set update_checks\.max_update_norm"):
        JobConfig.model_validate({"secure_aggregation": {}, "privacy": {"enabled": False}})
    with pytest.raises(ValueError, match="must be above 3"):
        SecureAggregationConfig(threshold=3).threshold_for(6)


# --------------------------------------------------------------------- whole rounds


def _expected_sum(
    vectors: list[np.ndarray], included: list[int], encoding: FixedPoint
) -> np.ndarray:
    total = np.zeros(vectors[0].size, dtype=encoding.dtype)
    for i in included:
        total += encoding.encode(vectors[i])
    return total


def _never_both_shares(received: list[Message]) -> None:
    """No secret of any node reached the coordinator as both a seed and a key share."""
    seeds, keys = set(), set()
    for reply in received:
        record = reply.content.config_records.get(wire.SECAGG_KEY)
        if record is not None and "seed_owners" in record:
            seeds.update(record["seed_owners"])  # type: ignore[arg-type]
            keys.update(record["key_owners"])  # type: ignore[arg-type]
    assert not seeds & keys


STAGES = ("setup", "share-keys", "masked-input", "unmask")


@st.composite
def _rounds(draw: st.DrawFn) -> tuple[int, int, int, int, dict[int, str], int]:
    n = draw(st.integers(2, 10))
    degree = graph.effective_degree(draw(st.integers(1, n - 1)), n)
    threshold = draw(st.integers(degree // 2 + 1, degree))
    bits = draw(st.sampled_from([32, 64]))
    drops = draw(st.dictionaries(st.integers(0, n - 1), st.sampled_from(STAGES), max_size=n))
    return n, degree, threshold, bits, drops, draw(st.integers(0, 10**6))


def _oracle(
    n: int, near: dict[int, tuple[int, ...]], t: int, drops: dict[int, str]
) -> tuple[list[int], list[int], bool]:
    """What the protocol must do: (U1, U3, whether the sum can be unmasked)."""
    u1 = [i for i in range(n) if drops.get(i) != "setup"]
    # A node refuses to share with fewer than t neighbours left, and to mask with fewer
    # than t that shared with it: to the coordinator both look like a drop.
    u2 = [i for i in u1 if drops.get(i) != "share-keys" and len(set(near[i]) & set(u1)) >= t]
    u3 = [i for i in u2 if drops.get(i) != "masked-input" and len(set(near[i]) & set(u2)) >= t]
    answering = {i for i in u3 if drops.get(i) != "unmask" and len(set(near[i]) & set(u3)) + 1 >= t}
    left = set(u2) - set(u3)
    needed = list(u3) + [j for j in left if set(near[j]) & set(u3)]
    rebuildable = bool(u3) and all(len(set(near[j]) & answering) >= t for j in needed)
    connected = _connected(u3, near)
    return u1, u3, rebuildable and connected


def _connected(nodes: list[int], near: dict[int, tuple[int, ...]]) -> bool:
    if not nodes:
        return False
    seen, frontier = {nodes[0]}, [nodes[0]]
    while frontier:
        for q in near[frontier.pop()]:
            if q in nodes and q not in seen:
                seen.add(q)
                frontier.append(q)
    return len(seen) == len(nodes)


@given(_rounds())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_the_unmasked_sum_is_exact_with_dropouts_or_the_round_fails_cleanly(
    case: tuple[int, int, int, int, dict[int, str], int],
) -> None:
    """Random n, k, t, word size, and a drop stage per node: the sum is the exact
    integer sum of the updates of exactly the nodes that sent a masked vector,
    or the round fails; in no case does the coordinator get both shares of one node."""
    n, degree, threshold, bits, drops, seed = case
    size = 37
    vectors = updates(n, size, seed)
    nodes = [Node(node_id=100 + i, update=vectors[i], drop_at=drops.get(i)) for i in range(n)]
    config = SecureAggregationConfig(neighbours=degree, threshold=threshold, bits=bits)  # type: ignore[arg-type]
    outcome, grid = run_round(nodes, config, size=size, seed=seed)
    near = graph.neighbours(range(n), degree, random.Random(seed))
    u1, u3, succeeds = _oracle(n, near, threshold, drops)
    _never_both_shares(grid.received)
    if succeeds:
        assert outcome.failure is None, outcome.failure
        encoding = FixedPoint(bits=bits, bound=BOUND, summands=len(u1))  # type: ignore[arg-type]
        expected = _expected_sum(vectors, u3, encoding)
        assert outcome.encoded_sum is not None
        assert np.array_equal(outcome.encoded_sum, expected)  # bit for bit
        assert outcome.mean_update is not None
        assert np.array_equal(outcome.mean_update["w"], encoding.decode_sum(expected) / len(u3))
        assert outcome.survivors == [100 + i for i in u3]
    else:
        assert outcome.failure is not None and outcome.mean_update is None
        assert outcome.encoded_sum is None


def test_a_round_with_too_many_dropouts_fails_with_the_reason() -> None:
    vectors = updates(5, 10, 1)
    nodes = [Node(100 + i, vectors[i], drop_at="unmask" if i < 3 else None) for i in range(5)]
    outcome, grid = run_round(nodes, SecureAggregationConfig(), size=10)
    assert outcome.failure is not None and "share(s), 3 needed" in outcome.failure
    assert outcome.mean_update is None
    _never_both_shares(grid.received)


def test_the_coordinator_sees_no_single_update() -> None:
    """Everything the coordinator receives, and every secret it may rebuild, leaves
    each masked vector uniformly scrambled; only the sum comes out."""
    n, size = 10, 4000
    vectors = updates(n, size, 3)
    # Node 0 goes silent at unmasking (still in the sum), node 1 after sharing its keys
    # (the coordinator then rebuilds its masking key and removes its pairwise masks).
    drops = {0: "unmask", 1: "masked-input"}
    nodes = [Node(100 + i, vectors[i], drop_at=drops.get(i)) for i in range(n)]
    outcome, grid = run_round(nodes, SecureAggregationConfig(neighbours=6), size=size)
    assert outcome.failure is None and 101 not in outcome.survivors
    encoding = FixedPoint(bits=32, bound=BOUND, summands=n)
    setup_keys = {
        r.metadata.src_node_id - 100: wire.read(wire.SetupReply, r.content[wire.SECAGG_KEY], "")
        for r in grid.received
        if "cipher_key" in r.content.config_records.get(wire.SECAGG_KEY, {})
    }
    key_shares: dict[int, list[shamir.Share]] = {}
    masked = {
        r.metadata.src_node_id: r.content.array_records[wire.MASKED_KEY][wire.MASKED_ARRAY].numpy()
        for r in grid.received
        if wire.MASKED_KEY in r.content.array_records
    }
    seed_shares: dict[int, list[shamir.Share]] = {}
    for reply in grid.received:
        record = reply.content.config_records.get(wire.SECAGG_KEY)
        if record is None or "seed_owners" not in record:
            continue
        position = reply.metadata.src_node_id - 100
        for owner, share in zip(record["seed_owners"], record["seed_shares"], strict=True):  # type: ignore[arg-type]
            seed_shares.setdefault(int(owner), []).append(  # type: ignore[call-overload]
                shamir.Share.from_bytes(position + 1, share)  # type: ignore[arg-type]
            )
        for owner, share in zip(record["key_owners"], record["key_shares"], strict=True):  # type: ignore[arg-type]
            key_shares.setdefault(int(owner), []).append(  # type: ignore[call-overload]
                shamir.Share.from_bytes(position + 1, share)  # type: ignore[arg-type]
            )
    assert len(masked) == n - 1 and set(key_shares) == {1}
    near_1 = set(graph.neighbours(range(n), 6, random.Random(0))[1])
    # The one masking key the coordinator may rebuild: node 1's (it dropped).
    dropped_key = crypto.PrivateKey(shamir.combine(key_shares[1], 4))
    context = b"run 1 round 1"
    for node_id, vector in masked.items():
        position = node_id - 100
        # The coordinator can rebuild this node's self-mask seed (it survived), and
        # the pairwise mask it shares with the dropped node 1 ...
        unmasked = vector.copy()
        removable = [(shamir.combine(seed_shares[position], 4), True)]
        if position in near_1:
            pairwise = dropped_key.agree(setup_keys[position].mask_key, crypto.MASK_KEY, context)
            removable.append((pairwise, position < 1))
        masks.apply_masks(unmasked, removable)
        # ... but its pairwise masks with survivors remain: unrelated to the update.
        guess = encoding.decode_sum(unmasked)
        truth = vectors[position]
        assert abs(np.corrcoef(guess, truth)[0, 1]) < 0.1
        assert not np.array_equal(unmasked, encoding.encode(truth))
        # The masked words look uniform: the top bit is set about half the time.
        assert 0.45 < float(np.mean(vector >> np.uint32(31))) < 0.55


def _no_training() -> np.ndarray:
    raise AssertionError("this stage must not train")


def _node_in_unmask_stage(n: int = 4) -> tuple[secagg.SessionState, RecordDict]:
    """Node 0's state right before unmasking, from a real round among n nodes."""
    vectors = updates(n, 5, 0)
    nodes = [Node(100 + i, vectors[i], drop_at="unmask") for i in range(n)]
    run_round(nodes, SecureAggregationConfig(), size=5)
    state = secagg.load(nodes[0].store)
    assert state.stage == "masked-input"
    return state, nodes[0].store


def test_a_node_refuses_to_reveal_both_shares_of_one_neighbour() -> None:
    _, store = _node_in_unmask_stage()
    with pytest.raises(secagg.SecAggRefusedError, match=r"both shares .* position\(s\) \[1\]"):
        secagg.answer(wire.Unmask(survivors=[1, 2], dropped=[1]), store, _no_training)
    # Nothing was revealed, and the session is still waiting for a proper request.
    assert secagg.load(store).stage == "masked-input"


def test_a_node_answers_one_unmask_request_per_round() -> None:
    _, store = _node_in_unmask_stage()
    reply = secagg.answer(wire.Unmask(survivors=[1, 2], dropped=[3]), store, _no_training)
    assert reply[wire.SECAGG_KEY]["key_owners"] == [3]
    with pytest.raises(secagg.SecAggRefusedError, match="second unmask request"):
        secagg.answer(wire.Unmask(survivors=[1, 2, 3], dropped=[]), store, _no_training)


def test_a_request_out_of_order_is_refused() -> None:
    vectors = updates(3, 5, 0)
    node = Node(100, vectors[0])
    setup = wire.Setup(
        context="c", position=0, cohort_size=3, neighbours=[1, 2], threshold=2, bits=32
    )
    secagg.begin_round(setup, node.store)
    with pytest.raises(secagg.SecAggRefusedError, match="'unmask' arrived after stage 'setup'"):
        secagg.answer(wire.Unmask(survivors=[1, 2], dropped=[]), node.store, _no_training)


def test_an_update_outside_the_range_is_reported_by_the_node() -> None:
    vectors = updates(5, 5, 0)
    vectors[1][2] = 3 * BOUND
    nodes = [Node(100 + i, vectors[i]) for i in range(5)]
    outcome, grid = run_round(nodes, SecureAggregationConfig(), size=5)
    assert "outside the secure-aggregation range" in outcome.dropped[101]
    refusals = [r for r in grid.received if "refusal" in r.content.config_records]
    assert len(refusals) == 1 and refusals[0].metadata.src_node_id == 101
    # The other four go on without it: their sum, exactly.
    assert outcome.failure is None and outcome.survivors == [100, 102, 103, 104]
    encoding = FixedPoint(bits=32, bound=BOUND, summands=5)
    assert np.array_equal(outcome.encoded_sum, _expected_sum(vectors, [0, 2, 3, 4], encoding))


def test_a_tampered_share_is_not_accepted() -> None:
    """A coordinator that swaps the sealed shares of two senders is caught by AES-GCM."""

    def swap(message: Message) -> Message:
        record = message.content.config_records.get(wire.SECAGG_KEY)
        if record is not None and record.get("stage") == "masked-input":
            boxes = list(record["sealed"])  # type: ignore[arg-type]
            record["sealed"] = boxes[::-1]
        return message

    vectors = updates(3, 5, 0)
    outcome, _ = run_round(
        [Node(100 + i, vectors[i]) for i in range(3)],
        SecureAggregationConfig(),
        size=5,
        tamper=swap,
    )
    assert all("does not open" in why for why in outcome.dropped.values())
    assert outcome.failure is not None


def test_a_node_refuses_a_threshold_at_or_below_half_its_neighbours() -> None:
    """With t ≤ k/2 a coordinator could split honest neighbours into seed givers and key
    givers: the node validates t itself rather than trusting the coordinator."""
    setup = wire.Setup(
        context="c", position=0, cohort_size=5, neighbours=[1, 2, 3, 4], threshold=3, bits=32
    )
    record = ConfigRecord({**setup.model_dump(), "threshold": 2})
    with pytest.raises(wire.SecAggProtocolError, match="above half of the 4 neighbours"):
        wire.read_stage(record)


def test_a_node_refuses_a_sum_smaller_than_its_minimum() -> None:
    """A node dropping at setup shrinks the sum to 4: nodes whose policy wants 5 stop at
    stage 2, before anything is trained or shared."""
    vectors = updates(5, 5, 0)
    nodes = [
        Node(100 + i, vectors[i], drop_at="setup" if i == 0 else None, min_summands=5)
        for i in range(5)
    ]
    outcome, _ = run_round(nodes, SecureAggregationConfig(), size=5)
    assert outcome.failure is not None
    assert all("policy minimum of 5" in outcome.dropped[100 + i] for i in range(1, 5))


def test_an_update_whose_norm_exceeds_the_bound_is_refused_though_each_entry_fits() -> None:
    vectors = updates(5, 16, 0)
    vectors[2] = np.full(16, 0.9 * BOUND)  # every entry within R, the L2 norm 3.6 R
    outcome, _ = run_round(
        [Node(100 + i, vectors[i]) for i in range(5)], SecureAggregationConfig(), size=16
    )
    assert "L2 norm" in outcome.dropped[102]
    assert outcome.failure is None and 102 not in outcome.survivors


def test_the_node_forgets_the_round_after_unmasking() -> None:
    _, store = _node_in_unmask_stage()
    secagg.answer(wire.Unmask(survivors=[1, 2], dropped=[3]), store, _no_training)
    state = secagg.load(store)
    assert state.stage == "unmask"
    assert state.cipher_private == state.mask_private == state.seed == b""
    assert state.seed_shares == state.key_shares == []
