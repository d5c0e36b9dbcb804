"""Overhead of ``GradWatch`` on ``model.fit``, per Keras backend, with and without jit.

For each backend (a fresh subprocess each: Keras picks its backend at import time) and each
``jit_compile`` setting, the same MLP is trained with and without the callback, interleaved,
``--repeats`` times. Each fit runs two epochs; the second one (steady state: traced, warmed up) is
timed with epoch hooks only, so Keras keeps its asynchronous batch dispatch. The overhead is the
median over repeats of (watched epoch time / plain epoch time) - 1, in wall-clock time and in the
process's CPU time (all threads; robust to other processes sharing the machine).

Usage::

    python benchmarks/keras_overhead.py                 # all backends, jit off and on
    python benchmarks/keras_overhead.py --backends jax --every 1 10
    python benchmarks/keras_overhead.py --torch-compile  # also jit_compile=True on torch (slow)

Pinned to one CPU thread per process so the numbers do not depend on what else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

WORKER_FLAG = "--worker"


def worker(backend: str, jit: bool, every: int, repeats: int, steps: int, width: int, depth: int, batch: int) -> dict:
    os.environ["KERAS_BACKEND"] = backend
    if backend == "jax":
        os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    import numpy as np

    if backend == "torch":
        import torch

        torch.set_num_threads(1)
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras

    from gradwatch import GradWatch

    rng = np.random.default_rng(0)
    x = rng.normal(size=(steps * batch, width)).astype("float32")
    y = rng.integers(0, 10, size=steps * batch).astype("int32")

    class EpochTimer(keras.callbacks.Callback):
        async_safe = True

        def __init__(self) -> None:
            super().__init__()
            self.times: list[tuple[float, float]] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.start = (time.perf_counter(), time.process_time())

        def on_epoch_end(self, epoch, logs=None):
            self.times.append((time.perf_counter() - self.start[0], time.process_time() - self.start[1]))

    def run(watched: bool) -> tuple[float, float]:
        keras.utils.set_random_seed(0)
        layers = [keras.Input((width,))] + [keras.layers.Dense(width, activation="relu") for _ in range(depth)]
        model = keras.Sequential(layers + [keras.layers.Dense(10)])
        model.compile(optimizer=keras.optimizers.Adam(1e-4), jit_compile=jit,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        timer = EpochTimer()
        callbacks = [timer] + ([GradWatch(every=every)] if watched else [])
        model.fit(x, y, batch_size=batch, epochs=2, shuffle=False, verbose=0, callbacks=callbacks)
        return timer.times[1]

    walls, cpus, plain_times, watched_times = [], [], [], []
    for _ in range(repeats):
        plain = run(False)
        watched = run(True)
        plain_times.append(plain[0])
        watched_times.append(watched[0])
        walls.append(watched[0] / plain[0])
        cpus.append(watched[1] / plain[1])
    return {
        "backend": backend,
        "jit_compile": jit,
        "every": every,
        "step_ms_plain": 1000 * float(np.median(plain_times)) / steps,
        "step_ms_watched": 1000 * float(np.median(watched_times)) / steps,
        "overhead": float(np.median(walls)) - 1.0,
        "overhead_min": float(np.min(walls)) - 1.0,
        "overhead_max": float(np.max(walls)) - 1.0,
        "overhead_cpu": float(np.median(cpus)) - 1.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["tensorflow", "torch", "jax"])
    parser.add_argument("--every", nargs="+", type=int, default=[1])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30, help="steps per epoch")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--torch-compile", action="store_true", help="also time jit_compile=True on torch")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    args = parser.parse_args(argv)
    results = []
    for backend in args.backends:
        for jit in (False, True):
            if backend == "torch" and jit and not args.torch_compile:
                continue
            for every in args.every:
                config = [backend, str(jit), str(every), str(args.repeats), str(args.steps), str(args.width),
                          str(args.depth), str(args.batch)]
                env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
                out = subprocess.run([sys.executable, __file__, WORKER_FLAG, *config], env=env,
                                     capture_output=True, text=True)
                if out.returncode:
                    print(out.stderr[-2000:], file=sys.stderr)
                    return out.returncode
                result = json.loads(out.stdout.strip().splitlines()[-1])
                results.append(result)
                if args.json:
                    print(json.dumps(result), flush=True)
    if not args.json:
        print(f"MLP {args.depth}x{args.width}, batch {args.batch}, Adam, {args.steps} steps/epoch, "
              f"1 CPU thread, median of {args.repeats}; {platform.processor() or platform.machine()}, "
              f"python {platform.python_version()}")
        print("| backend | jit_compile | every | step, plain | step, watched | wall overhead (min..max) | CPU overhead |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in results:
            print(f"| {r['backend']} | {r['jit_compile']} | {r['every']} | {r['step_ms_plain']:.2f} ms | "
                  f"{r['step_ms_watched']:.2f} ms | {100 * r['overhead']:+.1f}% "
                  f"({100 * r['overhead_min']:+.1f}..{100 * r['overhead_max']:+.1f}%) | {100 * r['overhead_cpu']:+.1f}% |")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == WORKER_FLAG:
        b, j, e, r, s, w, d, bs = sys.argv[2:10]
        print(json.dumps(worker(b, j == "True", int(e), int(r), int(s), int(w), int(d), int(bs))))
        sys.exit(0)
    sys.exit(main())
