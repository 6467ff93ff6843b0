"""Router math on hand-built cases: expert picks, gates, slots, drops, BPR, noise, expert choice."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipup_jax.models import routing
from tests.numerics import assert_close, assert_trees_equal, reduction_bound

# jit once per shape instead of compiling every primitive eagerly: keeps the file fast.
route = jax.jit(routing.top_k_routing, static_argnames=("top_k", "capacity", "renormalize", "batch_priority",
                                                        "noise_std"))


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# 4 tokens, 2 experts, all prefer expert 0; top-1 probabilities sigmoid(2), sigmoid(1), sigmoid(3), sigmoid(4).
ALL_TO_E0 = jnp.array([[2.0, 0.0], [1.0, 0.0], [3.0, 0.0], [4.0, 0.0]])
# 3 tokens, 3 experts: preferences t0: e0 > e1, t1: e1 > e0, t2: e2 > e0.
TOP2 = jnp.array([[3.0, 2.0, 0.0], [2.0, 3.0, 0.0], [1.0, 0.0, 3.0]])


@pytest.mark.parametrize(
    "args, expected",
    [
        ((16, 4, 1, 1.0), 4),  # exact
        ((16, 4, 2, 1.25), 12),  # ceil(10) -> multiple of 4
        ((100, 8, 2, 1.1), 28),  # ceil(27.5) = 28
        ((100, 64, 1, 0.01), 4),  # at least multiple_of
        ((8, 2, 2, 4.0), 8),  # 32 capped at num_tokens
        ((77, 8, 2, None), 77),  # dropless
    ],
)
def test_capacity(args, expected):
    assert routing.capacity(*args) == expected


def test_capacity_ignores_float_noise_and_validates():
    assert 1.1 * 100 / 10 > 11  # float noise the rounding must absorb
    assert routing.capacity(100, 10, 1, 1.1, multiple_of=1) == 11
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="capacity_factor"):
            routing.capacity(16, 4, 1, bad)


def test_top1_first_tokens_win_and_drops_get_zero_gate():
    r = route(ALL_TO_E0, top_k=1, capacity=2)
    np.testing.assert_array_equal(r.expert_index, [[0], [0], [0], [0]])
    np.testing.assert_array_equal(r.slot, [[0], [1], [2], [3]])
    np.testing.assert_array_equal(r.kept, [[True], [True], [False], [False]])
    np.testing.assert_allclose(r.gate, [[1.0], [1.0], [0.0], [0.0]])  # renormalised top-1 gate is 1
    np.testing.assert_array_equal(routing.assignment_counts(r, 2), [2, 0])
    assert float(routing.drop_fraction(r)) == pytest.approx(0.5)


def test_unrouted_tokens_are_dropped_and_take_no_slot():
    routed = jnp.array([False, True, False, True])
    r = routing.top_k_routing(ALL_TO_E0, top_k=1, capacity=2, routed=routed)
    # Without the mask tokens 0 and 1 would hold expert 0's two slots (the previous test); here 1 and 3 do.
    np.testing.assert_array_equal(r.kept, [[False], [True], [False], [True]])
    np.testing.assert_array_equal(r.slot[routed], [[0], [1]])
    np.testing.assert_allclose(r.gate, [[0.0], [1.0], [0.0], [1.0]])
    dropless = routing.top_k_routing(TOP2, top_k=2, capacity=3, routed=jnp.array([True, False, True]))
    np.testing.assert_array_equal(dropless.kept, [[True, True], [False, False], [True, True]])


def test_raw_gates_are_the_softmax_probabilities():
    r = route(ALL_TO_E0, top_k=1, capacity=2, renormalize=False)
    np.testing.assert_allclose(r.gate, [[sigmoid(2)], [sigmoid(1)], [0.0], [0.0]], rtol=1e-6)
    np.testing.assert_allclose(r.probs[:, 0], [sigmoid(2), sigmoid(1), sigmoid(3), sigmoid(4)], rtol=1e-6)


def test_batch_priority_gives_slots_to_the_most_confident_tokens():
    r = route(ALL_TO_E0, top_k=1, capacity=2, batch_priority=True)
    # top-1 probabilities rank tokens 3 > 2 > 0 > 1
    np.testing.assert_array_equal(r.slot[:, 0], [2, 3, 1, 0])
    np.testing.assert_array_equal(r.kept[:, 0], [False, False, True, True])
    np.testing.assert_allclose(r.gate[:, 0], [0.0, 0.0, 1.0, 1.0])


def test_batch_priority_breaks_ties_by_token_index():
    r = route(jnp.zeros((4, 2)).at[:, 0].set(1.0), top_k=1, capacity=2, batch_priority=True)
    np.testing.assert_array_equal(r.slot[:, 0], [0, 1, 2, 3])


def test_top2_every_first_choice_before_any_second_choice():
    r = route(TOP2, top_k=2, capacity=2)
    np.testing.assert_array_equal(r.expert_index, [[0, 1], [1, 0], [2, 0]])
    # choice 0 fills e0, e1, e2 slot 0; then t0->e1 slot 1, t1->e0 slot 1, t2->e0 slot 2 (over capacity)
    np.testing.assert_array_equal(r.slot, [[0, 1], [0, 1], [0, 2]])
    np.testing.assert_array_equal(r.kept, [[True, True], [True, True], [True, False]])
    # renormalised over the two chosen: e^3/(e^3+e^2) = sigmoid(1); no renormalisation after the drop
    np.testing.assert_allclose(r.gate, [[sigmoid(1), sigmoid(-1)], [sigmoid(1), sigmoid(-1)], [sigmoid(2), 0.0]],
                               rtol=1e-6)
    np.testing.assert_array_equal(routing.assignment_counts(r), [2, 2, 1])
    assert float(routing.drop_fraction(r)) == pytest.approx(1 / 6)


def test_top2_raw_gates():
    r = route(TOP2, top_k=2, capacity=2, renormalize=False)
    z = math.exp(3) + math.exp(2) + 1
    np.testing.assert_allclose(r.gate[0], [math.exp(3) / z, math.exp(2) / z], rtol=1e-6)


def test_dropless_capacity_keeps_everything():
    logits = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
    r = route(logits, top_k=2, capacity=routing.capacity(32, 4, 2, None))
    assert bool(jnp.all(r.kept))
    assert float(routing.drop_fraction(r)) == 0.0
    np.testing.assert_allclose(np.sum(r.gate, -1), 1.0, rtol=1e-6)
    assert int(np.sum(routing.assignment_counts(r))) == 64


def test_router_math_is_float32():
    r = route(TOP2.astype(jnp.bfloat16), top_k=2, capacity=2)
    assert r.gate.dtype == r.probs.dtype == r.logits.dtype == jnp.float32
    assert r.expert_index.dtype == r.slot.dtype == jnp.int32


def test_noise_needs_rng_and_changes_routing_reproducibly():
    logits = jnp.zeros((64, 8))  # all ties: without noise, top_k picks expert 0 for everyone
    with pytest.raises(ValueError, match="rng"):
        route(logits, top_k=1, capacity=64, noise_std=1.0)
    clean = route(logits, top_k=1, capacity=64, noise_std=0.0, rng=jax.random.key(1))
    np.testing.assert_array_equal(clean.expert_index, 0)
    np.testing.assert_array_equal(clean.noisy_logits, clean.logits)
    a = route(logits, top_k=1, capacity=64, noise_std=1.0, rng=jax.random.key(1))
    b = route(logits, top_k=1, capacity=64, noise_std=1.0, rng=jax.random.key(1))
    assert len(np.unique(a.expert_index)) > 1
    np.testing.assert_array_equal(a.expert_index, b.expert_index)
    np.testing.assert_array_equal(a.logits, logits)  # probs/logits stay clean
    np.testing.assert_allclose(a.probs, 1 / 8)
    np.testing.assert_array_equal(a.expert_index[:, 0], jnp.argmax(a.noisy_logits, -1))


def test_expert_choice_picks_each_experts_top_tokens():
    logits = jnp.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
    # p(e0) per token: sigmoid(2), sigmoid(-1), sigmoid(1), sigmoid(-3); p(e1) = 1 - p(e0)
    ec = routing.expert_choice_routing(logits, capacity=2)
    np.testing.assert_array_equal(ec.token_index, [[0, 2], [3, 1]])
    np.testing.assert_allclose(ec.gate, [[sigmoid(2), sigmoid(1)], [sigmoid(3), sigmoid(1)]], rtol=1e-6)
    assert float(routing.unchosen_fraction(ec)) == 0.0
    ec1 = routing.expert_choice_routing(logits, capacity=1)
    np.testing.assert_array_equal(ec1.token_index, [[0], [3]])
    assert float(routing.unchosen_fraction(ec1)) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        routing.expert_choice_routing(logits, capacity=5)


def test_jit_and_vmap_over_groups_match_unbatched():
    logits = np.random.default_rng(2).normal(size=(3, 16, 4)).astype(np.float32)
    keys = jax.random.split(jax.random.key(3), 3)
    group_route = functools.partial(route, top_k=2, capacity=6, batch_priority=True, noise_std=0.5)
    batched = jax.tree.map(np.asarray, jax.jit(jax.vmap(group_route))(logits, rng=keys))
    for g in range(3):
        single = group_route(logits[g], rng=keys[g])
        assert_trees_equal([getattr(batched, n)[g] for n in ("expert_index", "slot", "kept")],
                           [getattr(single, n) for n in ("expert_index", "slot", "kept")], "routing")
        for name in ("gate", "probs", "noisy_logits"):  # a softmax over 4 experts, then a top-2 renormalisation
            assert_close(getattr(batched, name)[g], getattr(single, name), reduction_bound(4, chain=2), name)
    counts, drops = jax.jit(jax.vmap(lambda r: (routing.assignment_counts(r), routing.drop_fraction(r))))(batched)
    assert counts.shape == (3, 4) and drops.shape == (3,)
    assert np.all(np.asarray(counts) <= 6)

    ec = jax.jit(jax.vmap(functools.partial(routing.expert_choice_routing, capacity=4)))(logits)
    np.testing.assert_array_equal(ec.token_index[1], routing.expert_choice_routing(logits[1], 4).token_index)
