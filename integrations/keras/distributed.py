"""Keras under ``tf.distribute`` (MirroredStrategy): measure the gradients after cross-replica
aggregation, identically on every replica.

Keras hands each replica's gradients to the optimizer's ``apply`` and sums them across replicas
inside it (``TFOptimizer._all_reduce_sum_gradients``); each replica's gradients carry a
``1 / replicas`` share of the loss. gradwatch's step (:mod:`gradwatch.integrations.keras.step`)
therefore, in a replica context with more than one replica:

1. sums the replicas' gradients itself with the replica context's ``all_reduce`` — the same
   collective Keras uses — so the norms it measures are those of the aggregated gradient, equal to
   a single-device run on the same global batch, and every replica computes the same skip / clip /
   LR decision from the same numbers;
2. hands each replica ``1 / replicas`` of the (steered) sum, which Keras's own sum turns back into
   the aggregated gradient;
3. writes its statistics row from the first replica only (:func:`first_replica`).

On JAX, ``keras.distribution.DataParallel`` runs the step as one program over the device mesh: the
gradients ``apply`` sees are already global (XLA inserts the reduction), so nothing here applies.
On the other backends and outside a replica context every function is the identity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def replicas_in_sync(backend: str) -> int:
    """The number of replicas whose gradients Keras will sum in this ``apply`` (1: none).

    Args:
        backend: ``keras.backend.backend()``.

    Returns:
        ``num_replicas_in_sync`` inside a TensorFlow replica context of a strategy, else 1.
    """
    if backend != "tensorflow":
        return 1
    import tensorflow as tf

    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return 1
    context = tf.distribute.get_replica_context()
    return int(context.num_replicas_in_sync) if context is not None else 1


def sum_over_replicas(grads: Sequence[Any]) -> list[Any]:
    """The gradients summed across replicas (``all_reduce(SUM)``), None gradients kept as None.

    Args:
        grads: This replica's gradients.

    Returns:
        The aggregated gradients, the same on every replica.
    """
    import tensorflow as tf

    out = list(grads)
    present = [i for i, g in enumerate(out) if g is not None]
    if present:
        reduced = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, [out[i] for i in present])
        for i, g in zip(present, reduced):
            out[i] = g
    return out


def share(grads: Sequence[Any], replicas: int) -> list[Any]:
    """Each replica's share of aggregated gradients: Keras sums ``replicas`` of them back.

    Args:
        grads: The aggregated (and steered) gradients.
        replicas: The number of replicas.

    Returns:
        ``grads / replicas`` (IndexedSlices: their values divided).
    """
    import tensorflow as tf

    out: list[Any] = []
    for g in grads:
        if g is None:
            out.append(None)
        elif isinstance(g, tf.IndexedSlices):
            out.append(tf.IndexedSlices(g.values / tf.cast(replicas, g.values.dtype), g.indices, g.dense_shape))
        else:
            out.append(g / tf.cast(replicas, g.dtype))
    return out


def first_replica() -> bool:
    """True unless this is a replica other than the first of this worker under a TensorFlow
    strategy: the first local replica writes gradwatch's statistics row (every replica computes the
    same one).

    Raises:
        ValueError: when the replica's id is not known while tracing (a strategy gradwatch does
            not support); gradwatch then stops and training goes on unmeasured.
    """
    try:
        import tensorflow as tf
    except ImportError:  # pragma: no cover - not the TensorFlow backend
        return True
    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return True
    replica = tf.get_static_value(tf.distribute.get_replica_context().replica_id_in_sync_group)
    if replica is None:
        raise ValueError(
            "gradwatch writes one statistics row per step from the first replica, but this "
            f"strategy ({type(tf.distribute.get_strategy()).__name__}) does not tell the replica's id "
            "while tracing. Use MirroredStrategy, or file an issue."
        )
    local = len(getattr(tf.distribute.get_strategy().extended, "worker_devices", ()) or ()) or 1
    return int(replica) % local == 0


def apply_unless(skip: Any, apply_step: Any, grads: Sequence[Any], trainable_variables: Any, rate: Any) -> None:
    """Run ``apply_step(grads, trainable_variables, rate)`` on every replica unless ``skip``.

    The condition is taken in a cross-replica context (``merge_call``), as Keras's own
    ``LossScaleOptimizer`` does: a ``cond`` in a replica context cannot hold the ``merge_call``
    that the optimizer's ``apply`` makes. ``skip`` is the same on every replica (it comes from the
    aggregated gradients); the first replica's value is used.

    Args:
        skip: This replica's skip flag (a boolean tensor).
        apply_step: ``(grads, trainable_variables, rate) -> None``, the optimizer step of one
            replica.
        grads: This replica's gradients (its share of the steered aggregate).
        trainable_variables: The variables, or None.
        rate: The learning rate in force (a tensor).
    """
    import tensorflow as tf

    def cross_replica(distribution: Any, skip: Any, grads: Any, trainable_variables: Any, rate: Any) -> None:
        first = distribution.experimental_local_results(skip)[0]

        def step() -> None:
            distribution.extended.call_for_each_replica(apply_step, args=(grads, trainable_variables, rate))

        tf.cond(first, lambda: None, step)

    tf.distribute.get_replica_context().merge_call(cross_replica, args=(skip, list(grads), trainable_variables, rate))


__all__ = ["apply_unless", "first_replica", "replicas_in_sync", "share", "sum_over_replicas"]
