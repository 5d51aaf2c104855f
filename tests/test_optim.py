"""The paper's schedule, warm-up, linear scaling and weight-decay coverage."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _command_line import config_from_command_line
from _configs import load_config

from resnet_jax.train import config as config_lib
from resnet_jax.train import optim
from resnet_jax.train.loop import build_optimizer


def _schedule(arg, **overrides):
    config = load_config(arg)
    for k, v in overrides.items():
        config[k] = v
    derived = config_lib.validate(config)
    return build_optimizer(config, derived)[1], derived


def test_paper_schedule_at_the_boundaries():
    schedule, derived = _schedule("resnet20")
    assert derived.total_steps == 64_000
    got = [float(schedule(s)) for s in (0, 31_999, 32_000, 47_999, 48_000, 63_999)]
    np.testing.assert_allclose(got, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)


def test_resnet110_warms_up_at_0_01_for_400_iterations():
    schedule, derived = _schedule("resnet110")
    assert derived.warmup_steps == 400
    got = [float(schedule(s)) for s in (0, 399, 400, 31_999, 32_000)]
    np.testing.assert_allclose(got, [0.01, 0.01, 0.1, 0.1, 0.01], rtol=1e-6)
    plain, _ = _schedule("resnet56")
    assert float(plain(0)) == pytest.approx(0.1)


def test_linear_scaling_rule_rescales_lr_and_steps():
    schedule, derived = _schedule("resnet20,batch=1024")
    assert derived.learning_rate == pytest.approx(0.8)
    assert derived.total_steps == 8_000 and derived.boundaries == (4_000, 6_000)
    np.testing.assert_allclose(
        [float(schedule(s)) for s in (3_999, 4_000, 6_000)], [0.8, 0.08, 0.008], rtol=1e-6
    )


def test_linear_warmup_ramps_to_the_base_rate():
    s = optim.step_schedule(0.1, (100,), 0.1, warmup_steps=10, warmup_learning_rate=0.0, warmup="linear")
    np.testing.assert_allclose([float(s(i)) for i in (0, 5, 10, 100)], [0.0, 0.05, 0.1, 0.01], rtol=1e-6)


def _params():
    return {
        "conv": {"kernel": jnp.ones((3, 3, 2, 2))},
        "bn": {"scale": jnp.ones((2,)), "bias": jnp.ones((2,))},
        "head": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones((3,))},
    }


@pytest.mark.parametrize(
    "target, decayed",
    [
        ("all", {"conv/kernel", "bn/scale", "bn/bias", "head/kernel", "head/bias"}),
        ("kernels", {"conv/kernel", "head/kernel"}),
        ("no_bn", {"conv/kernel", "head/kernel", "head/bias"}),
    ],
)
def test_weight_decay_mask(target, decayed):
    mask = optim.weight_decay_mask(_params(), target)
    flat = {"/".join(str(k.key) for k in path): v for path, v in jax.tree_util.tree_leaves_with_path(mask)}
    assert {k for k, v in flat.items() if v} == decayed


def test_sgd_matches_the_update_rule_by_hand():
    """g' = g + wd*w; v = mu*v + g'; w -= lr*v (torch.optim.SGD / Caffe with a fixed lr)."""
    lr, mu, wd = 0.1, 0.9, 1e-4
    tx = optim.sgd(optax.constant_schedule(lr), mu, False, wd)
    w = jnp.array([1.0, -2.0])
    state = tx.init(w)
    v = np.zeros(2)
    w_ref = np.array([1.0, -2.0])
    for g in ([0.5, 0.25], [-1.0, 2.0], [0.1, 0.1]):
        updates, state = tx.update(jnp.array(g), state, w)
        w = optax.apply_updates(w, updates)
        v = mu * v + (np.array(g) + wd * w_ref)
        w_ref = w_ref - lr * v
    np.testing.assert_allclose(np.asarray(w), w_ref, rtol=1e-6)


def _imagenet_plan(config):
    derived = config_lib.validate(config)  # ILSVRC-2012's sizes: no data needed
    schedule = build_optimizer(config, derived)[1]
    warm = derived.warmup_steps
    steps = (0, warm // 2, warm - 1, warm, derived.boundaries[0])
    return derived, [float(schedule(s)) for s in steps]


def test_goyal_schedule_is_the_same_however_the_batch_is_given():
    """`:resnet50,goyal,batch=1024` and `:resnet50,goyal --config.batch_size=1024` are one recipe:
    Goyal et al. 2017 warm up linearly over 5 epochs from 0.1 to 0.1 x 1024/256 = 0.4."""
    in_arg = _imagenet_plan(config_from_command_line("imagenet.py:resnet50,goyal,batch=1024"))
    by_flag = _imagenet_plan(
        config_from_command_line("imagenet.py:resnet50,goyal", "--config.batch_size=1024")
    )
    assert by_flag[0] == in_arg[0]
    np.testing.assert_allclose(by_flag[1], in_arg[1], rtol=1e-6)
    derived, rates = in_arg
    steps_per_epoch = 1_281_167 // 1024
    assert (derived.steps_per_epoch, derived.warmup_steps) == (steps_per_epoch, round(5 * steps_per_epoch))
    assert derived.warmup_learning_rate == pytest.approx(0.1) and derived.learning_rate == pytest.approx(0.4)
    warm = derived.warmup_steps
    np.testing.assert_allclose(
        rates, [0.1, 0.1 + 0.3 * (warm // 2) / warm, 0.1 + 0.3 * (warm - 1) / warm, 0.4, 0.04], rtol=1e-5
    )
