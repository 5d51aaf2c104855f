"""A model as an ONNX file: the eval-mode program, traced to a jaxpr, written op by op.

Why a converter of our own rather than jax2onnx: the jax2onnx releases that accept
orbax-checkpoint >= 0.11.37 (0.13.1 onwards) cap it below that, which would pin this
project's checkpointing back, and the last uncapped one (0.13.0) was built for an older JAX:
on jax 0.10 some of its plugins fail to import, importing them all takes tens of seconds, and
it patches ``flax.linen.Conv`` while it runs. The jax2tf -> tf2onnx route is closed too: jax2tf
now only emits ``XlaCallModule`` (serialized StableHLO), which tf2onnx cannot read. A ResNet in
eval mode, traced, is a short list of JAX primitives (convolution, elementwise arithmetic, a
max pool, pad and strided slice for shortcut A, a sum and one matrix product); each maps onto
one or two ONNX operators, so this module needs only the ``onnx`` package to write the file
(and ``onnxruntime`` to run it). Any other primitive is refused by name.

The batch dimension is dynamic: the program is traced at two batch sizes and the dimensions
that differ between the two traces become the symbolic ``batch`` (a reshape gets -1 there, a
broadcast keeps 1 and lets ONNX's broadcasting do the rest). Everything that does not depend
on the images (BatchNorm's ``scale * rsqrt(var + eps)``, a normalisation constant) is
evaluated once here, in float32 by JAX itself, and stored as an initializer.

Layout: the file takes what the JAX model takes (NHWC float32 images) and returns the logits.
ONNX convolutions and pools are NCHW, so each is wrapped in transposes; onnxruntime's graph
optimizer cancels the back-to-back pairs. Opset :data:`OPSET`, IR version :data:`IR_VERSION`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import onnx
from jax.extend.core import Literal
from onnx import TensorProto, helper, numpy_helper

import resnet_jax
from resnet_jax.errors import UserError
from resnet_jax.files import atomic_write_bytes

# Opset 17 (ONNX 1.12, 2022): every operator used here exists in it with its current
# signature, and runtimes from onnxruntime 1.12 and its mobile builds on load it. IR version 8
# is the one that release wrote, so older runtimes accept the file too.
OPSET = 17
IR_VERSION = 8
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
BATCH = "batch"
# Two batch sizes (neither 1, which jnp may special-case) tell batch dimensions from others.
_TRACE_BATCHES = (2, 3)
_PROTOBUF_LIMIT = 2**31 - 1  # a ModelProto bigger than this cannot be serialized in one piece

_ELEMENTWISE = {
    "add": "Add",
    "sub": "Sub",
    "mul": "Mul",
    "div": "Div",
    "max": "Max",
    "min": "Min",
    "neg": "Neg",
    "exp": "Exp",
    "log": "Log",
    "tanh": "Tanh",
    "logistic": "Sigmoid",
    "sqrt": "Sqrt",
    "abs": "Abs",
}
_PASS_THROUGH = ("copy", "copy_p", "optimization_barrier")
_CALLS = ("jaxpr", "call_jaxpr", "fun_jaxpr")  # where call-like primitives keep their body


class OnnxExportError(UserError, ValueError):
    """The traced program holds something this converter does not write (named in the message).

    A UserError: on the command line, one ``error:`` line and exit status 2 (a model in bfloat16,
    a layer this converter has no translation for)."""


def write_onnx(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    variables: Mapping[str, Any],
    image_shape: Sequence[int],
    path: str | os.PathLike,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes ``apply_fn(variables, images)`` (eval mode, float32 NHWC images ``[batch,
    *image_shape]``, any batch) to ``path`` as an ONNX model, atomically.

    ``metadata``: stored in the model's ``metadata_props`` (strings as they are, anything else
    as JSON). Returns what was written: opset, IR version, input/output names and shapes, the
    operator types used.
    """
    image_shape = tuple(image_shape)
    if len(image_shape) != 3 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in image_shape):
        raise ValueError(
            f"image_shape: got {image_shape!r}, allowed: three positive ints (height, width, channels)"
        )
    model = to_onnx_model(apply_fn, variables, image_shape, metadata)
    data = model.SerializeToString()
    atomic_write_bytes(path, data)
    graph = model.graph
    return {
        "opset": OPSET,
        "ir_version": IR_VERSION,
        "converter": "resnet_jax.export.onnx (jaxpr to ONNX)",
        "input": {"name": INPUT_NAME, "shape": _value_shape(graph.input[0]), "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": _value_shape(graph.output[0])},
        "operators": sorted({node.op_type for node in graph.node}),
    }


def to_onnx_model(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    variables: Mapping[str, Any],
    image_shape: Sequence[int],
    metadata: Mapping[str, Any] | None = None,
) -> onnx.ModelProto:
    """The checked ONNX ModelProto of ``apply_fn(variables, images)`` (see :func:`write_onnx`)."""
    constants = jax.tree.map(jnp.asarray, dict(variables))

    def fn(images):
        return apply_fn(constants, images)

    traces = [
        jax.make_jaxpr(fn)(jax.ShapeDtypeStruct((b, *image_shape), jnp.float32)) for b in _TRACE_BATCHES
    ]
    builder = _Builder()
    a, b = (t.jaxpr for t in traces)
    if len(a.invars) != 1 or len(a.outvars) != 1:
        raise OnnxExportError(
            f"apply_fn must take one image batch and return one array; its program has "
            f"{len(a.invars)} input(s) and {len(a.outvars)} output(s)"
        )
    outputs = builder.run(a, b, traces[0].consts, [INPUT_NAME])
    out_var, out_var_b = a.outvars[0], b.outvars[0]
    builder.emit("Identity", [builder.tensor(outputs[0], out_var.aval.dtype)], OUTPUT_NAME)

    in_dims = [BATCH, *image_shape]
    out_dims = _dims(out_var.aval.shape, out_var_b.aval.shape)
    graph = helper.make_graph(
        builder.nodes,
        "resnet_jax",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, in_dims)],
        [helper.make_tensor_value_info(OUTPUT_NAME, _onnx_dtype(out_var.aval.dtype), out_dims)],
        initializer=builder.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="resnet_jax",
        producer_version=resnet_jax.__version__,
        ir_version=IR_VERSION,
    )
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key = str(key)
        entry.value = value if isinstance(value, str) else json.dumps(value, default=_json_default)
    if model.ByteSize() > _PROTOBUF_LIMIT:
        raise OnnxExportError(
            f"the ONNX model would be {model.ByteSize() / 2**30:.1f} GiB; a single-file ONNX model "
            "is limited to 2 GiB (export a smaller network)"
        )
    onnx.checker.check_model(model)
    return model


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # numpy / jax arrays and scalars
        return obj.tolist()
    raise TypeError(f"metadata value of type {type(obj).__name__} is not JSON serializable")


def _value_shape(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _dims(shape_a: Sequence[int], shape_b: Sequence[int]) -> list[int | str]:
    return [BATCH if x != y else int(x) for x, y in zip(shape_a, shape_b)]


def _onnx_dtype(dtype: Any) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


class _Builder:
    """Walks two traces of one program in lockstep, appending ONNX nodes and initializers.

    ``env`` maps each JAX variable to an ONNX tensor name, or to a numpy array when its value
    does not depend on the images (those are folded, never emitted as nodes).
    """

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.env: dict[Any, str | np.ndarray] = {}
        self._count = 0

    def fresh(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def emit(self, op: str, inputs: Sequence[str], output: str | None = None, **attrs: Any) -> str:
        output = output or self.fresh(op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [output], name=self.fresh(op), **attrs))
        return output

    def tensor(self, value: str | np.ndarray, dtype: Any = None) -> str:
        """An ONNX name for ``value``: itself if it is one, else a new initializer."""
        if isinstance(value, str):
            return value
        array = np.asarray(value, dtype=dtype) if dtype is not None else np.asarray(value)
        name = self.fresh("const")
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def ints(self, values: Sequence[int]) -> str:
        return self.tensor(np.asarray(values, dtype=np.int64))

    def read(self, var: Any) -> str | np.ndarray:
        if isinstance(var, Literal):
            return np.asarray(var.val, dtype=var.aval.dtype)
        return self.env[var]

    def run(self, jaxpr_a: Any, jaxpr_b: Any, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
        """Converts ``jaxpr_a`` (``jaxpr_b``: the same program traced at another batch size)."""
        if len(jaxpr_a.eqns) != len(jaxpr_b.eqns):
            raise OnnxExportError(
                "the traced program's structure depends on the batch size (different equations at batch "
                f"sizes {_TRACE_BATCHES}); only its shapes may"
            )
        for var, value in zip(jaxpr_a.constvars, consts):
            self.env[var] = np.asarray(value)
        for var, value in zip(jaxpr_a.invars, args):
            self.env[var] = value
        for eqn, eqn_b in zip(jaxpr_a.eqns, jaxpr_b.eqns):
            if eqn.primitive.name != eqn_b.primitive.name:
                raise OnnxExportError(
                    f"the traced program differs between batch sizes {_TRACE_BATCHES}: "
                    f"{eqn.primitive.name} against {eqn_b.primitive.name}"
                )
            for var in eqn.outvars:
                dtype = np.dtype(var.aval.dtype)
                if jnp.issubdtype(dtype, jnp.floating) and dtype != np.float32:  # bfloat16 included
                    # ONNX's Conv and MaxPool take no bfloat16 (opset 17), and a float16 file would
                    # not match the JAX model's arithmetic: the export is float32 throughout.
                    raise OnnxExportError(
                        f"the model computes in {dtype} ({eqn.primitive.name}); ONNX export is float32 only "
                        "(build or load the model with dtype float32)"
                    )
            ins = [self.read(v) for v in eqn.invars]
            dyn = [
                [x != y for x, y in zip(o.aval.shape, ob.aval.shape)]
                for o, ob in zip(eqn.outvars, eqn_b.outvars)
            ]
            if any(k in eqn.params for k in _CALLS):  # folded inside, equation by equation
                outs = self._call(eqn, eqn_b, ins)
            elif all(isinstance(v, np.ndarray) for v in ins) and not any(any(d) for d in dyn):
                outs = _evaluate(eqn, ins)
            else:
                outs = [self._primitive(eqn, ins, dyn[0], eqn_b)]
            for var, value in zip(eqn.outvars, outs):
                self.env[var] = value
        return [self.read(v) for v in jaxpr_a.outvars]

    def _call(self, eqn: Any, eqn_b: Any, ins: list[Any]) -> list[Any]:
        key = next(k for k in _CALLS if k in eqn.params)
        body, body_b = eqn.params[key], eqn_b.params[key]
        consts = getattr(body, "consts", ())
        return self.run(getattr(body, "jaxpr", body), getattr(body_b, "jaxpr", body_b), consts, ins)

    def _primitive(self, eqn: Any, ins: list[Any], dyn: list[bool], eqn_b: Any) -> str:
        name, p = eqn.primitive.name, eqn.params
        out_aval = eqn.outvars[0].aval
        x = ins[0]
        if name in _ELEMENTWISE:
            # ONNX wants both operands of one type; JAX's weakly typed literals are converted.
            dtypes = [v.aval.dtype for v in eqn.invars]
            return self.emit(_ELEMENTWISE[name], [self.tensor(v, dt) for v, dt in zip(ins, dtypes)])
        if name == "rsqrt":
            return self.emit("Reciprocal", [self.emit("Sqrt", [self.tensor(x)])])
        if name == "integer_pow":
            y = self.tensor(np.asarray(p["y"], dtype=out_aval.dtype))
            return self.emit("Pow", [self.tensor(x), y])
        if name in _PASS_THROUGH:
            return self.emit("Identity", [self.tensor(x)])
        if name == "convert_element_type":
            return self.emit("Cast", [self.tensor(x)], to=_onnx_dtype(p["new_dtype"]))
        if name == "conv_general_dilated":
            return self._conv(eqn, ins)
        if name == "reduce_window_max":
            return self._max_pool(eqn, x)
        if name == "reduce_sum":
            axes = self.ints(sorted(p["axes"]))
            return self.emit("ReduceSum", [self.tensor(x), axes], keepdims=0)
        if name == "dot_general":
            return self._matmul(eqn, ins)
        if name in ("reshape", "squeeze"):
            if name == "reshape" and p.get("dimensions") is not None:
                raise OnnxExportError(f"reshape with dimensions={p['dimensions']} is not supported")
            if sum(dyn) > 1:
                raise OnnxExportError(f"{name} to {out_aval.shape} keeps more than one batch-sized dimension")
            target = [-1 if d else int(s) for s, d in zip(out_aval.shape, dyn)]
            return self.emit("Reshape", [self.tensor(x), self.ints(target)])
        if name == "broadcast_in_dim":
            return self._broadcast(eqn, x, dyn)
        if name == "transpose":
            return self.emit("Transpose", [self.tensor(x)], perm=list(p["permutation"]))
        if name == "pad":
            return self._pad(eqn, ins)
        if name == "slice":
            return self._slice(eqn, x, eqn_b)
        raise OnnxExportError(
            f"JAX primitive {name!r} has no ONNX translation here; supported: "
            f"{', '.join(sorted([*_ELEMENTWISE, *_SUPPORTED]))} and calls (jit, custom_jvp/vjp)"
        )

    def _conv(self, eqn: Any, ins: list[Any]) -> str:
        p = eqn.params
        if any(d != 1 for d in p["lhs_dilation"]) or p["batch_group_count"] != 1:
            raise OnnxExportError(
                "conv_general_dilated with input dilation or batch groups is not supported "
                f"(lhs_dilation={p['lhs_dilation']}, batch_group_count={p['batch_group_count']})"
            )
        padding = p["padding"]
        if isinstance(padding, str) or any(lo < 0 or hi < 0 for lo, hi in padding):
            raise OnnxExportError(
                f"conv_general_dilated padding {padding!r}: only explicit non-negative pads"
            )
        lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
        x, kernel = ins
        x = self.emit("Transpose", [self.tensor(x)], perm=list(lhs_spec))  # to N, C, spatial...
        if isinstance(kernel, np.ndarray):  # the usual case: a weight, permuted once here
            kernel = self.tensor(np.transpose(kernel, rhs_spec))
        else:
            kernel = self.emit("Transpose", [kernel], perm=list(rhs_spec))
        y = self.emit(
            "Conv",
            [x, kernel],
            strides=list(p["window_strides"]),
            dilations=list(p["rhs_dilation"]),
            pads=[lo for lo, _ in padding] + [hi for _, hi in padding],
            group=int(p["feature_group_count"]),
        )
        return self.emit("Transpose", [y], perm=[int(i) for i in np.argsort(out_spec)])

    def _max_pool(self, eqn: Any, x: Any) -> str:
        p = eqn.params
        window, strides, padding = p["window_dimensions"], p["window_strides"], p["padding"]
        nhwc = (
            len(window) == 4
            and all(window[i] == 1 and strides[i] == 1 and tuple(padding[i]) == (0, 0) for i in (0, 3))
            and all(d == 1 for d in (*p["base_dilation"], *p["window_dilation"]))
        )
        if not nhwc:
            raise OnnxExportError(
                f"reduce_window_max: only NHWC max pools over H and W are supported (window {window}, "
                f"strides {strides}, padding {padding})"
            )
        # reduce_window_max pads with -inf; ONNX MaxPool ignores padded cells: the same maxima.
        x = self.emit("Transpose", [self.tensor(x)], perm=[0, 3, 1, 2])
        y = self.emit(
            "MaxPool",
            [x],
            kernel_shape=list(window[1:3]),
            strides=list(strides[1:3]),
            pads=[padding[1][0], padding[2][0], padding[1][1], padding[2][1]],
        )
        return self.emit("Transpose", [y], perm=[0, 2, 3, 1])

    def _matmul(self, eqn: Any, ins: list[Any]) -> str:
        (lhs_c, rhs_c), (lhs_b, rhs_b) = eqn.params["dimension_numbers"]
        lhs, rhs = ins
        lhs_rank, rhs_rank = (len(v.aval.shape) for v in eqn.invars)
        if lhs_b or rhs_b or tuple(lhs_c) != (lhs_rank - 1,) or rhs_rank != 2:
            raise OnnxExportError(
                "dot_general: only a product over the last axis of the input with a matrix is supported "
                f"(dimension_numbers {eqn.params['dimension_numbers']})"
            )
        if tuple(rhs_c) == (1,):
            rhs = (
                np.transpose(rhs)
                if isinstance(rhs, np.ndarray)
                else self.emit("Transpose", [rhs], perm=[1, 0])
            )
        return self.emit("MatMul", [self.tensor(lhs), self.tensor(rhs)])

    def _broadcast(self, eqn: Any, x: Any, dyn: list[bool]) -> str:
        p = eqn.params
        shape, dims = p["shape"], p["broadcast_dimensions"]
        in_shape = eqn.invars[0].aval.shape
        # Operand axes go where broadcast_dimensions says, 1 elsewhere; batch-sized axes stay 1
        # and ONNX's numpy-style broadcasting widens them where the result is used.
        aligned = [1] * len(shape)
        for axis, size in zip(dims, in_shape):
            aligned[axis] = int(size)
        target = [1 if d else int(s) for s, d in zip(shape, dyn)]
        if isinstance(x, np.ndarray):
            return self.tensor(np.broadcast_to(x.reshape(aligned), target))
        y = self.emit("Reshape", [x, self.ints(aligned)])
        return self.emit("Expand", [y, self.ints(target)])

    def _pad(self, eqn: Any, ins: list[Any]) -> str:
        x, value = ins
        config = eqn.params["padding_config"]
        if any(interior != 0 or lo < 0 or hi < 0 for lo, hi, interior in config):
            raise OnnxExportError(f"pad {config}: only non-negative edge padding is supported")
        pads = self.ints([lo for lo, _, _ in config] + [hi for _, hi, _ in config])
        dtype = eqn.invars[0].aval.dtype
        return self.emit("Pad", [self.tensor(x), pads, self.tensor(value, dtype)], mode="constant")

    def _slice(self, eqn: Any, x: Any, eqn_b: Any) -> str:
        p = eqn.params
        in_a, in_b = eqn.invars[0].aval.shape, eqn_b.invars[0].aval.shape
        starts, limits = list(p["start_indices"]), list(p["limit_indices"])
        steps = list(p["strides"] or [1] * len(starts))
        for axis, (size_a, size_b) in enumerate(zip(in_a, in_b)):
            if size_a != size_b:  # a batch axis: only taken whole
                if (starts[axis], limits[axis], steps[axis]) != (0, size_a, 1):
                    raise OnnxExportError("slice: a batch-sized axis can only be taken whole")
                limits[axis] = np.iinfo(np.int64).max
        return self.emit(
            "Slice",
            [
                self.tensor(x),
                self.ints(starts),
                self.ints(limits),
                self.ints(range(len(starts))),
                self.ints(steps),
            ],
        )


_SUPPORTED = (
    "rsqrt",
    "integer_pow",
    *_PASS_THROUGH,
    "convert_element_type",
    "conv_general_dilated",
    "reduce_window_max",
    "reduce_sum",
    "dot_general",
    "reshape",
    "squeeze",
    "broadcast_in_dim",
    "transpose",
    "pad",
    "slice",
)


# Folding BatchNorm's constants equation by equation through JAX's eager dispatch compiles one
# tiny program per shape (seconds for a ResNet-50); numpy computes these few the same way in
# float32 (rsqrt as 1/sqrt may differ from XLA's in the last bit, far below the export's bound).
_NUMPY = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "div": np.divide,
    "max": np.maximum,
    "min": np.minimum,
    "neg": np.negative,
    "sqrt": np.sqrt,
    "rsqrt": lambda x: np.reciprocal(np.sqrt(x)),
}


def _evaluate(eqn: Any, values: list[np.ndarray]) -> list[np.ndarray]:
    """One equation on constant inputs: numpy for the common arithmetic, else JAX itself."""
    out_aval = eqn.outvars[0].aval
    name, p = eqn.primitive.name, eqn.params
    if name in _NUMPY and all(v.dtype == out_aval.dtype for v in values):
        return [np.asarray(_NUMPY[name](*values), dtype=out_aval.dtype)]
    if name == "broadcast_in_dim" and not p.get("sharding"):
        aligned = [1] * len(p["shape"])
        for axis, size in zip(p["broadcast_dimensions"], values[0].shape):
            aligned[axis] = size
        return [np.broadcast_to(values[0].reshape(aligned), p["shape"])]
    if name == "convert_element_type":
        return [values[0].astype(p["new_dtype"])]
    out = eqn.primitive.bind(*values, **eqn.params)  # a leaf primitive: no sub-program to bind
    outs = out if eqn.primitive.multiple_results else [out]
    return [np.asarray(o) for o in outs]
