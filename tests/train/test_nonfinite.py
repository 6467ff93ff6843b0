"""NaN/Inf in a batch or a gradient: config.nonfinite="stop" raises naming the step and tensor and keeps the last
good checkpoint; "skip" drops exactly the bad steps' updates and counts them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipup_jax.checkpoints.format import load_checkpoint
from clipup_jax.config import ModelConfig, TextConfig, VisionConfig
from clipup_jax.models.towers import VisionTower
from clipup_jax.train.health import Health, NonFiniteGuard, NonFiniteLoss
from clipup_jax.train.trainer import train
from tests.train.test_trainer import _config

# Smaller than test_trainer's TINY: each test here compiles a train step, and one block per tower is enough.
MICRO = ModelConfig(vision=VisionConfig(image_size=16, patch_size=8, width=16, depth=1, heads=2, mlp_dim=32),
                    text=TextConfig(vocab_size=64, context_length=8, width=16, depth=1, heads=2, mlp_dim=32),
                    embed_dim=8)
MARK = 1000.0  # a finite first pixel that makes the wrapped model's image-tower gradients Inf (`inf_grads`)


@jax.custom_vjp
def _inf_grad_when_marked(features: jax.Array, pixels: jax.Array) -> jax.Array:
    return features


_inf_grad_when_marked.defvjp(lambda features, pixels: (features, pixels[0, 0, 0, 0] == MARK),
                             lambda marked, g: (g * jnp.where(marked, jnp.inf, 1.0), None))


@pytest.fixture
def inf_grads(monkeypatch):
    """A test-only wrap of the model: a batch whose first pixel is MARK keeps a finite loss but gets Inf
    gradients in the image tower. Unmarked batches see the identity (forward and backward)."""
    call = VisionTower.__call__

    def wrapped(self, pixels):
        features, records = call(self, pixels)
        return _inf_grad_when_marked(features, pixels), records

    monkeypatch.setattr(VisionTower, "__call__", wrapped)


def _batches(n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    size, length = MICRO.vision.image_size, MICRO.text.context_length
    return [{"pixels": rng.standard_normal((16, size, size, 3)).astype(np.float32),
             "tokens": rng.integers(1, MICRO.text.vocab_size, (16, length)).astype(np.int32)} for _ in range(n)]


def _nan_pixel(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    pixels = batch["pixels"].copy()
    pixels[3, 5, 7, 1] = np.nan
    return {**batch, "pixels": pixels}


def _marked(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    pixels = batch["pixels"].copy()
    pixels[0, 0, 0, 0] = MARK
    return {**batch, "pixels": pixels}


def _data(batches: list[dict[str, np.ndarray]]):
    return lambda cfg, process_index, process_count: iter(batches)


def _tiny(steps: int, policy: str, **fields):
    config = _config(MICRO, steps=steps)
    config.checkpoint_every = 100  # the first and the last step only, unless a test says otherwise
    config.optim.schedule = "constant"  # a step's LR must not depend on total_steps: the runs differ in length
    config.nonfinite = policy
    for key, value in fields.items():
        config[key] = value
    return config


def _finite(params: dict[str, np.ndarray]) -> bool:
    return all(np.isfinite(v).all() for v in params.values())


def test_stop_on_an_inf_gradient_keeps_the_last_good_checkpoint(tmp_path, inf_grads):
    """Step 3's gradients are Inf. Steps are checked one late (log_every > steps), so step 4 has already run when
    the error comes: neither step 3's nor step 4's state may reach the disk."""
    b = _batches(5)
    config = _tiny(5, "stop", log_every=10, checkpoint_every=2)
    with pytest.raises(NonFiniteLoss) as error:
        train(config, tmp_path / "run", data=_data([b[0], b[1], _marked(b[2]), b[3], b[4]]))
    message = str(error.value)
    assert message.startswith("step 3: not finite: grad/visual/"), message  # the input and the loss were finite
    assert message.endswith("latest good checkpoint: step 2"), message
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.metadata["step"] == 2 and _finite(ckpt.params)


def test_skip_drops_exactly_the_bad_updates(tmp_path, inf_grads, capsys):
    """A NaN batch at step 3 and an Inf-gradient batch at step 5, skipped: the params end bitwise where a run
    that never saw those two batches ends, so neither the params nor the Adam moments that move them were
    touched (the step counter still counts the skipped steps)."""
    b = _batches(4)
    skipped = train(_tiny(6, "skip"), tmp_path / "skip",
                    data=_data([b[0], b[1], _nan_pixel(b[0]), b[2], _marked(b[3]), b[3]]))
    out = capsys.readouterr().out
    assert "warning: step 3: not finite: batch/pixels, loss, grad/" in out
    assert "warning: step 5: not finite: grad/visual/" in out
    assert [h["train/skipped_nonfinite_steps"] for h in skipped["train"]] == [0, 0, 1, 1, 2, 2]
    assert np.isnan(skipped["train"][2]["loss"]) and np.isfinite(skipped["train"][4]["loss"])
    clean = train(_tiny(4, "skip"), tmp_path / "clean", data=_data(b))
    assert [h["train/skipped_nonfinite_steps"] for h in clean["train"]] == [0] * 4
    got, want = load_checkpoint(tmp_path / "skip"), load_checkpoint(tmp_path / "clean")
    assert got.metadata["step"] == 6 and want.metadata["step"] == 4 and _finite(got.params)
    for name in want.params:
        np.testing.assert_array_equal(got.params[name], want.params[name], err_msg=name)


NAMES = ["batch/pixels", "loss", "grad/a", "grad/b", "update/a", "update/b"]


def _health(bad: set[int]) -> Health:
    applied = not bad & {0, 1, 2, 3}  # the step's inputs, loss and gradients were finite
    return Health(finite=np.bool_(not bad), applied=np.bool_(applied),
                  nonfinite={name: np.bool_(i in bad) for i, name in enumerate(NAMES)})


def _guard(policy: str, limit: int = 10) -> NonFiniteGuard:
    config = _tiny(5, policy, max_nonfinite_skips=limit)
    return NonFiniteGuard(config, lambda: 7, verbose=True)


def test_guard_checks_one_step_late_and_stops_naming_the_tensors():
    guard = _guard("stop")
    guard.check(1, _health(set()), now=False)
    guard.check(2, _health({0, 1, 2, 3}), now=False)  # launched; not looked at until step 3 is launched
    with pytest.raises(NonFiniteLoss, match=r"^step 2: not finite: batch/pixels, loss, grad/a, grad/b; the step "
                                            r"was not applied \(config.nonfinite='stop'\); latest good checkpoint: "
                                            r"step 7$"):
        guard.check(3, _health(set()), now=False)
    guard = _guard("stop")
    with pytest.raises(NonFiniteLoss, match=r"^step 1: not finite: loss, grad/a, grad/b, update/a \(\+1 more\)"):
        guard.check(1, _health({2, 3, 4, 5, 1}), now=True)  # before a save/log/eval: checked at once


def test_guard_skip_counts_and_limits_skips_in_a_row(capsys):
    guard = _guard("skip", limit=1)
    for step, bad in enumerate([set(), {3}, set(), {0}], start=1):  # a good step resets the run of skips
        guard.check(step, _health(bad), now=True)
    assert guard.skipped == 2
    assert capsys.readouterr().out.splitlines() == [
        "warning: step 2: not finite: grad/b; update skipped (1 skipped in this run)",
        "warning: step 4: not finite: batch/pixels; update skipped (2 skipped in this run)"]
    with pytest.raises(NonFiniteLoss, match=r"^step 5: 2 non-finite steps in a row, more than "
                                            r"config.max_nonfinite_skips=1 \(last: grad/a\)"):
        guard.check(5, _health({2}), now=True)


def test_an_update_that_overflows_stops_whatever_the_policy():
    """Finite inputs and gradients but non-finite parameters after the update: already applied, so no skip."""
    guard = _guard("skip")
    with pytest.raises(NonFiniteLoss, match=r"^step 1: the update from finite gradients made parameters "
                                            r"non-finite \(update/a\); lower config.optim.lr"):
        guard.check(1, _health({4}), now=True)
