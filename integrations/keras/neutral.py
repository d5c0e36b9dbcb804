"""TensorFlow graphs: give the optimizer gradients that Grappler optimizes as it would unwatched.

Grappler, TensorFlow's graph optimizer, rewrites a chain of elementwise arithmetic across node
boundaries only where the intermediate node has a single consumer. In an unwatched step, a
gradient's only consumer is the optimizer, so the last op of the gradient and the first of the
update are rewritten as one tree. Batch normalisation's ``gamma`` gradient is ``AddN * Rsqrt``;
SGD multiplies it by the learning rate, and Grappler's arithmetic optimizer reorders
``(AddN * Rsqrt) * lr`` into ``(AddN * lr) * Rsqrt``, which rounds differently. The moment
gradwatch reads that gradient (its norm, its zeros), the gradient has two consumers, the rewrite no
longer happens, and the watched run drifts from the unwatched one by one unit in the last place
from the first step on (then further on a run that diverges).

So gradwatch reads the gradients Keras computed, and hands the optimizer a copy of each gradient's
elementwise tail (:data:`REWRITABLE` ops, back to the first op that is not one of them or that has
other consumers): the copy has the optimizer as its only consumer, exactly as the original had in
the unwatched graph, and Grappler rewrites it the same way. Each copied op carries the attribute
``_gradwatch_copy``, without which Grappler's common-subexpression elimination would merge it
back into the original (and the original would again have two consumers). The copies cost one
elementwise op per copied node (a vector of a layer's width for ``gamma``); gradients that come
out of a matrix product, a reduction or a convolution are handed over as they are.

XLA (``jit_compile=True``) does not reassociate floating-point arithmetic, and neither do JAX and
PyTorch: there the gradients are handed over unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REWRITABLE = frozenset({
    "Add", "AddN", "AddV2", "Cast", "Identity", "Mul", "Neg", "RealDiv", "Reciprocal", "Reshape",
    "Square", "Sub",
})
"""Ops that Grappler's arithmetic, constant-folding and dependency optimizers may merge with a
single consumer (reassociation, broadcast minimisation, hoisting, identity removal)."""

MAX_COPIES = 64
"""Copied ops per gradient at most: a deeper elementwise tail is handed over from there on."""

MARK = "_gradwatch_copy"


def optimizer_copies(grads: Sequence[Any]) -> list[Any]:
    """The gradients to hand the optimizer in a TensorFlow graph (see the module docstring).

    Args:
        grads: The gradients (tensors, ``IndexedSlices`` or None), as gradwatch read them.

    Returns:
        For each, a copy of its elementwise tail (``IndexedSlices``: of its values), or the
        gradient itself outside a graph (eager) or when it cannot be copied.
    """
    import tensorflow as tf

    if tf.executing_eagerly():
        return list(grads)
    graph = tf.compat.v1.get_default_graph()

    def here(t: Any) -> Any:
        # Inside a cond branch every gradient must be a tensor of the branch's graph: Keras sums
        # the list with one op (``all_reduce``) that refuses a mix of graphs.
        return t if t.graph is graph else tf.identity(t)

    out = []
    for g in grads:
        if isinstance(g, tf.IndexedSlices):
            out.append(tf.IndexedSlices(here(tail_copy(g.values)), here(g.indices), here(g.dense_shape)))
        elif isinstance(g, tf.Tensor):
            out.append(here(tail_copy(g)))
        else:
            out.append(g)
    return out


def tail_copy(tensor: Any) -> Any:
    """A copy of ``tensor``'s elementwise tail, so that reading one of the two leaves the other's
    consumers (and so Grappler's rewrites of it) as they were; ``tensor`` itself when it is not a
    graph tensor or its last op is not :data:`REWRITABLE`.

    Args:
        tensor: A TensorFlow tensor (anything else is returned as it is).

    Returns:
        The copy, or ``tensor``.
    """
    import tensorflow as tf

    if not isinstance(tensor, tf.Tensor) or tf.executing_eagerly():
        return tensor
    budget = [MAX_COPIES]
    try:
        return _copy(tensor, budget, top=True)
    except (TypeError, ValueError, AttributeError):  # an op this TensorFlow builds differently
        return tensor


def _copy(tensor: Any, budget: list[int], *, top: bool = False) -> Any:
    op = getattr(tensor, "op", None)
    if op is None or op.type not in REWRITABLE or len(op.outputs) != 1 or budget[0] <= 0:
        return tensor
    # Below the top, only a node whose sole consumer is the op being copied was part of the
    # rewritable tree; a node with other consumers is a leaf of it and is read as it is.
    if not top and len(tensor.consumers()) != 1:
        return tensor
    budget[0] -= 1
    inputs = [_copy(t, budget) for t in op.inputs]
    return _rebuild(op, inputs)


def _rebuild(op: Any, inputs: list[Any]) -> Any:
    """The same op on ``inputs``, marked so that Grappler does not merge it with the original."""
    import tensorflow as tf

    op_def = op.op_def
    kwargs: dict[str, Any] = {}
    inferred: set[str] = set()
    position = 0
    for arg in op_def.input_arg:
        inferred.update(a for a in (arg.type_attr, arg.number_attr, arg.type_list_attr) if a)
        if arg.number_attr:
            count = int(op.get_attr(arg.number_attr))
            kwargs[arg.name] = inputs[position:position + count]
            position += count
        else:
            kwargs[arg.name] = inputs[position]
            position += 1
    for attr in op_def.attr:
        if attr.name not in inferred:
            kwargs[attr.name] = op.get_attr(attr.name)
    copy = getattr(tf.raw_ops, op.type)(**kwargs)
    copy.op._set_attr(MARK, tf.compat.v1.AttrValue(b=True))
    return copy


__all__ = ["MAX_COPIES", "REWRITABLE", "optimizer_copies", "tail_copy"]
