"""Each auxiliary router loss against arithmetic written out by hand, plus its effect on router gradients."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipup_jax.models import aux_losses, routing
from tests.numerics import assert_close, reduction_bound

LN2 = math.log(2.0)

# jit each loss once instead of compiling every primitive eagerly: keeps the file fast.
lb_loss = jax.jit(aux_losses.load_balancing_loss, static_argnames="num_choices")
z_loss = jax.jit(aux_losses.router_z_loss)
importance_loss = jax.jit(aux_losses.importance_loss)
load_loss = jax.jit(aux_losses.load_loss, static_argnames=("top_k", "noise_std", "exclude_self"))
local_entropy = jax.jit(aux_losses.local_entropy_loss)
global_entropy = jax.jit(aux_losses.global_entropy_loss, static_argnames="threshold")


def phi(x):
    """Standard normal CDF."""
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def test_load_balancing_is_one_at_perfect_balance():
    probs = jnp.full((2, 2), 0.5)
    # f = [1/2, 1/2], P = [1/2, 1/2]: 2 * (1/4 + 1/4) = 1
    assert float(lb_loss(probs, jnp.array([[0], [1]]))) == pytest.approx(1.0)


def test_load_balancing_all_tokens_to_one_expert():
    probs = jnp.array([[0.7, 0.1, 0.1, 0.1]] * 3)
    # f = [1, 0, 0, 0], P_0 = 0.7: 4 * 0.7
    assert float(lb_loss(probs, jnp.zeros((3, 1), jnp.int32))) == pytest.approx(2.8)


def test_load_balancing_top1_default_or_all_choices():
    probs = jnp.array([[0.4, 0.3, 0.2, 0.1], [0.5, 0.1, 0.3, 0.1]])  # P = [.45, .2, .25, .1]
    index = jnp.array([[0, 1], [0, 2]])
    # top-1: f = [1, 0, 0, 0] -> 4 * .45
    assert float(lb_loss(probs, index)) == pytest.approx(1.8)
    # both choices: f = [2, 1, 1, 0] / 4 -> 4 * (.5*.45 + .25*.2 + .25*.25) = 4 * .3375
    assert float(lb_loss(probs, index, num_choices=2)) == pytest.approx(1.35)


def test_router_z_loss():
    logits = jnp.array([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp = ln 2 and ln 4 = 2 ln 2: mean(ln2^2, 4 ln2^2) = 2.5 ln2^2
    assert float(z_loss(logits)) == pytest.approx(2.5 * LN2**2, rel=1e-6)
    assert z_loss(logits.astype(jnp.bfloat16)).dtype == jnp.float32


def test_importance_loss():
    # importance = [1.6, 0.4]: mean 1, variance ((.6)^2 + (.6)^2) / 2 = .36
    assert float(importance_loss(jnp.array([[0.9, 0.1], [0.7, 0.3]]))) == pytest.approx(0.36, rel=1e-5)
    assert float(importance_loss(jnp.full((5, 4), 0.25))) == pytest.approx(0.0, abs=1e-12)


def cv2(a, b):
    """CV^2 of two numbers: ((a - b) / 2)^2 / ((a + b) / 2)^2."""
    return ((a - b) / (a + b)) ** 2


def test_load_loss_vmoe_threshold():
    logits = jnp.array([[1.0, 0.0], [0.0, 0.0]])
    noisy = jnp.array([[1.5, -0.5], [0.2, 0.3]])
    # top-1 thresholds (largest noisy logit): 1.5 and 0.3; p = Phi((clean - threshold) / 1)
    load = [phi(1 - 1.5) + phi(0 - 0.3), phi(0 - 1.5) + phi(0 - 0.3)]
    got = load_loss(logits, noisy, top_k=1, noise_std=1.0)
    assert float(got) == pytest.approx(cv2(*load), rel=1e-5)
    # noise_std 0.5: the distances double
    load = [phi(-1.0) + phi(-0.6), phi(-3.0) + phi(-0.6)]
    assert float(load_loss(logits, noisy, top_k=1, noise_std=0.5)) == pytest.approx(cv2(*load), rel=1e-5)


def test_load_loss_shazeer_threshold_excludes_the_expert():
    logits = jnp.array([[1.0, 0.0], [0.0, 0.0]])
    noisy = jnp.array([[1.5, -0.5], [0.2, 0.3]])
    # threshold for e = largest noisy logit of the *other* expert
    load = [phi(1 + 0.5) + phi(0 - 0.3), phi(0 - 1.5) + phi(0 - 0.2)]
    got = load_loss(logits, noisy, top_k=1, noise_std=1.0, exclude_self=True)
    assert float(got) == pytest.approx(cv2(*load), rel=1e-5)


def test_load_loss_top2_thresholds():
    logits = jnp.array([[1.0, 0.0, 0.5]])
    noisy = jnp.array([[3.0, 1.0, 2.0]])  # 2nd largest = 2
    vmoe = np.array([phi(1 - 2), phi(0 - 2), phi(0.5 - 2)])
    # excluding e: e0 -> others [1, 2] -> 1; e1 -> [3, 2] -> 2; e2 -> [3, 1] -> 1
    shazeer = np.array([phi(1 - 1), phi(0 - 2), phi(0.5 - 1)])
    for exclude, load in ((False, vmoe), (True, shazeer)):
        got = load_loss(logits, noisy, top_k=2, noise_std=1.0, exclude_self=exclude)
        assert float(got) == pytest.approx(load.var() / load.mean() ** 2, rel=1e-5)
    with pytest.raises(ValueError, match="noise_std"):
        load_loss(logits, noisy, top_k=2, noise_std=0.0)


def test_local_entropy_loss():
    probs = jnp.array([[1.0, 0.0], [0.5, 0.5]])
    # H = [0, ln 2]
    assert float(local_entropy(probs)) == pytest.approx(LN2 / 2, rel=1e-6)
    assert bool(jnp.all(jnp.isfinite(jax.jit(jax.grad(aux_losses.local_entropy_loss))(probs))))


def test_global_entropy_loss():
    spread = jnp.array([[1.0, 0.0], [0.0, 1.0]])  # mean [.5, .5], H = ln 2
    one = jnp.array([[1.0, 0.0], [1.0, 0.0]])  # mean [1, 0], H = 0
    assert float(global_entropy(spread)) == pytest.approx(-LN2, rel=1e-6)
    assert float(global_entropy(one)) == pytest.approx(0.0, abs=1e-7)
    assert float(global_entropy(spread, threshold=1.0)) == pytest.approx(1.0 - LN2, rel=1e-6)
    assert float(global_entropy(spread, threshold=0.5)) == 0.0  # H = .69 > tau: inactive
    assert float(global_entropy(one, threshold=1.0)) == pytest.approx(1.0)


def test_combine_aux_losses():
    values = {"load_balancing": jnp.array(1.5), "router_z": jnp.array(4.0)}
    total = aux_losses.combine_aux_losses(values, {"load_balancing": 0.01, "router_z": 0.001, "load": 0.0})
    assert float(total) == pytest.approx(0.015 + 0.004)
    assert float(aux_losses.combine_aux_losses(values, {})) == 0.0
    with pytest.raises(ValueError, match="laod_balancing"):
        aux_losses.combine_aux_losses(values, {"laod_balancing": 0.0})
    with pytest.raises(ValueError, match="importance"):
        aux_losses.combine_aux_losses(values, {"importance": 0.005})


T, D, E, K = 16, 8, 4, 2
NOISE = 0.5
AUX = {
    "load_balancing": lambda r: aux_losses.load_balancing_loss(r.probs, r.expert_index),
    "router_z": lambda r: aux_losses.router_z_loss(r.logits),
    "importance": lambda r: aux_losses.importance_loss(r.probs),
    "load": lambda r: aux_losses.load_loss(r.logits, r.noisy_logits, K, NOISE),
    "local_entropy": lambda r: aux_losses.local_entropy_loss(r.probs),
    "global_entropy": lambda r: aux_losses.global_entropy_loss(r.probs),
}


@pytest.mark.parametrize("name", sorted(AUX))
def test_aux_loss_changes_router_gradient(name):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(T, D)).astype(np.float32)
    w = 0.1 * rng.normal(size=(D, E)).astype(np.float32)
    target = jnp.asarray(rng.normal(size=(E,)), jnp.float32)  # stands in for what the experts contribute to the task

    def loss(w, alpha):
        r = routing.top_k_routing(x @ w, K, capacity=6, noise_std=NOISE, rng=jax.random.key(0))
        task = jnp.sum(r.gate * target[r.expert_index])
        return task + alpha * AUX[name](r)

    grad = jax.jit(jax.grad(loss))
    g0, g1 = grad(w, 0.0), grad(w, 0.1)
    assert np.all(np.isfinite(np.asarray(g1)))
    assert np.max(np.abs(np.asarray(g1) - np.asarray(g0))) > 1e-6


def test_aux_losses_jit_and_vmap_over_groups():
    logits = np.random.default_rng(4).normal(size=(3, T, E)).astype(np.float32)
    keys = jax.random.split(jax.random.key(5), 3)
    route = functools.partial(routing.top_k_routing, top_k=K, capacity=6, noise_std=NOISE)
    per_group = jax.jit(lambda lg, k: {name: fn(route(lg, rng=k)) for name, fn in AUX.items()})
    batched = jax.jit(jax.vmap(per_group))(logits, keys)
    singles = [per_group(logits[g], keys[g]) for g in range(3)]
    for name in AUX:
        # routing (a softmax over E), then each loss's means over the T tokens and E experts
        assert_close(batched[name], [s[name] for s in singles], reduction_bound(T, chain=3), name)
