"""The training state: one pytree holding everything that changes during training."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec


@flax.struct.dataclass
class TrainState:
    """step, params, batch_stats, opt_state; `apply_fn` and `tx` are static (not saved)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: optax.OptState
    apply_fn: Callable = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

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
        }

    def replace_items(self, items: dict[str, Any]) -> TrainState:
        return self.replace(**items)


def create_train_state(
    model: flax.linen.Module,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    image_shape: tuple[int, int, int],
    mesh: Mesh,
) -> TrainState:
    """Initialises the state directly into its replicated placement on the mesh."""

    def init(key):
        variables = model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
        params = variables["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(params),
            apply_fn=model.apply,
            tx=tx,
        )

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(init, out_shardings=replicated)(rng)


def abstract_items(state: TrainState) -> dict[str, Any]:
    """Shapes, dtypes and shardings of the checkpointed items (what a restore fills in)."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state.checkpoint_items()
    )
