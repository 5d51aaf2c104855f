"""An exponential moving average (EMA) of the weights: parameters and BatchNorm statistics.

Polyak averaging in its exponential form (the TensorFlow `ExponentialMovingAverage`, timm's
`ModelEma`): after optimizer step t + 1 (t = 0, 1, ... counts the steps before it)

    ema <- decay_t * ema + (1 - decay_t) * w

for every parameter and every BN running statistic w, starting from the initial weights.
`decay_t = decay`, or with the warm-up `decay_t = min(decay, (1 + t) / (10 + t))` (TensorFlow's
`num_updates` rule), which lets the average forget the random initialisation quickly while the
weights still move fast. The BN statistics are averaged too, so that the averaged weights come
with statistics of similar age; they are not recomputed for the averaged weights.

The average lives in the train state (`TrainState.ema`, replicated like the weights) and is
updated inside the compiled step, so it costs no host transfer; `ema_settings` is a static part
of the state, so the step needs no argument for it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

# TensorFlow's constant in min(decay, (1 + t) / (10 + t)).
WARMUP_OFFSET = 10


@dataclasses.dataclass(frozen=True)
class EmaSettings:
    """`ema.decay` in (0, 1) and `ema.warmup` (see the module doc); hashable, as a static field."""

    decay: float
    warmup: bool = False


def settings_from_config(config: Any) -> EmaSettings | None:
    """The EMA the config asks for; None when `ema.decay` is None or 0 (off, the paper's recipe)."""
    decay = config.get("ema", {}).get("decay")
    if not decay:
        return None
    return EmaSettings(decay=float(decay), warmup=bool(config.ema.get("warmup", False)))


def decay_at(settings: EmaSettings, t: jax.Array) -> jax.Array:
    """decay_t of the update after optimizer step t + 1 (t = 0 for the first), as float32."""
    decay = jnp.float32(settings.decay)
    if not settings.warmup:
        return decay
    t = jnp.asarray(t, jnp.float32)
    return jnp.minimum(decay, (1.0 + t) / (WARMUP_OFFSET + t))


def initial(params: Any, batch_stats: Any) -> dict[str, Any]:
    """The average before any step: a copy of the weights (copied, so that donating the
    state's buffers never hands XLA one buffer twice)."""
    return jax.tree.map(jnp.copy, {"params": params, "batch_stats": batch_stats})


def update(ema: dict[str, Any], params: Any, batch_stats: Any, decay: jax.Array) -> dict[str, Any]:
    """One EMA step towards the new weights, in the average's dtype."""

    def step(average, new):
        d = decay.astype(average.dtype)
        return d * average + (1 - d) * new.astype(average.dtype)

    return jax.tree.map(step, ema, {"params": params, "batch_stats": batch_stats})


def apply(state: Any) -> Any:
    """`state` (just after its optimizer step) with its average moved towards its weights;
    unchanged when it keeps no average. Pure and traceable: called at the end of the step."""
    if state.ema is None:
        return state
    decay = decay_at(state.ema_settings, state.step - 1)
    return state.replace(ema=update(state.ema, state.params, state.batch_stats, decay))


def reset(state: Any) -> Any:
    """`state` with its average restarted at its current weights (after `init_from`)."""
    if state.ema is None:
        return state
    return state.replace(ema=initial(state.params, state.batch_stats))


def averaged(state: Any) -> Any:
    """`state` with the averaged weights in place of the raw ones (for evaluating them)."""
    return state.replace(params=state.ema["params"], batch_stats=state.ema["batch_stats"])
