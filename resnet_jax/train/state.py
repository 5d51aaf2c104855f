"""The training state: one pytree holding everything that changes during training."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from resnet_jax.train import ema as ema_lib


@flax.struct.dataclass
class TrainState:
    """step, params, batch_stats, opt_state; `apply_fn` and `tx` are static (not saved).

    `ema`: the exponential moving average of the weights, {'params', 'batch_stats'}, when
    `ema_settings` (static) asks for one (config `ema.decay`); else None, and checkpoints hold
    no 'ema' item, as before the option existed.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: optax.OptState
    apply_fn: Callable = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    ema: Any = None
    ema_settings: ema_lib.EmaSettings | None = flax.struct.field(pytree_node=False, default=None)

    @property
    def variables(self) -> dict[str, Any]:
        return {"params": self.params, "batch_stats": self.batch_stats}

    def checkpoint_items(self) -> dict[str, Any]:
        """What a checkpoint holds: the arrays, none of the static fields."""
        return {
            "step": self.step,
            "params": self.params,
            "batch_stats": self.batch_stats,
            "opt_state": self.opt_state,
        } | ({} if self.ema is None else {"ema": self.ema})

    def replace_items(self, items: dict[str, Any]) -> TrainState:
        return self.replace(**items)


def create_train_state(
    model: flax.linen.Module,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    image_shape: tuple[int, int, int],
    mesh: Mesh,
    ema_settings: ema_lib.EmaSettings | None = None,
) -> TrainState:
    """Initialises the state directly into its replicated placement on the mesh (with the
    weights' moving average, starting at the initial weights, when `ema_settings` is given)."""

    def init(key):
        variables = model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
        params = variables["params"]
        batch_stats = variables.get("batch_stats", {})
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=batch_stats,
            opt_state=tx.init(params),
            apply_fn=model.apply,
            tx=tx,
            ema=None if ema_settings is None else ema_lib.initial(params, batch_stats),
            ema_settings=ema_settings,
        )

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(init, out_shardings=replicated)(rng)


def abstract_items(state: TrainState) -> dict[str, Any]:
    """Shapes, dtypes and shardings of the checkpointed items (what a restore fills in)."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state.checkpoint_items()
    )
