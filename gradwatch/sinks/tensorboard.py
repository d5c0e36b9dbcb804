"""TensorBoard sink: gradwatch's scalars and findings as TensorBoard event files.

:class:`TensorBoardSink` writes real ``events.out.tfevents.*`` files with the ``tensorboard``
package's protocol buffers and record writer only: no TensorFlow and no PyTorch needed, so it works
the same under PyTorch, Keras (any backend) and JAX. Point TensorBoard at the directory
(``tensorboard --logdir runs``) and you see, per optimizer step:

* ``grad_norm/total``: the global gradient norm (unscaled, before any clipping);
* ``grad_norm/<group>``: a few grouped per-layer norms (see :func:`gradwatch.sinks.group_layers`);
* ``gradwatch/lr_factor``, ``gradwatch/clipped``, ``gradwatch/skipped`` and ``gradwatch/loss``;
* optionally a histogram ``gradwatch/tensor_grad_norm`` of the per-tensor gradient norms;

and, in the Text tab, ``gradwatch/findings``, ``gradwatch/actions`` and ``gradwatch/report``.

To log into a writer you already have (``torch.utils.tensorboard.SummaryWriter``, Lightning's
``TensorBoardLogger.experiment``), pass ``writer=``: anything with ``add_scalar(tag, value,
global_step)`` and ``add_text(tag, text, global_step)`` works.

Example::

    import gradwatch
    from gradwatch.sinks import TensorBoardSink

    watch = gradwatch.watch(model, optimizer)
    TensorBoardSink("runs/exp1").attach(watch.monitor)
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from gradwatch.errors import require
from gradwatch.sinks.base import Sink
from gradwatch.sinks.scalars import step_scalars

if TYPE_CHECKING:
    from gradwatch.findings import Action, Finding
    from gradwatch.monitor import Monitor
    from gradwatch.policy import Decision
    from gradwatch.report import Report
    from gradwatch.stats import StepStats

__all__ = ["TensorBoardSink"]

_file_ids = itertools.count()


class _EventFile:
    """An append-only TensorBoard event file (TFRecord framing with masked CRC32C)."""

    def __init__(self, log_dir: str, suffix: str = ".gradwatch") -> None:
        require("tensorboard", "tensorboard")
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        self._event_pb2 = event_pb2
        os.makedirs(log_dir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_file_ids)}{suffix}"
        self.path = os.path.join(log_dir, name)
        self._file: IO[bytes] = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._records = RecordWriter(self._file)
        self.add(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        self.flush()

    def add(self, event: Any) -> None:
        self._records.write(event.SerializeToString())

    def summary(self, step: int, values: list[Any]) -> None:
        from tensorboard.compat.proto import summary_pb2

        self.add(self._event_pb2.Event(
            wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values),
        ))

    def flush(self) -> None:
        self._records.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._records.flush()
            self._records.close()


def _scalar_value(tag: str, value: float) -> Any:
    from tensorboard.compat.proto import summary_pb2

    return summary_pb2.Summary.Value(tag=tag, simple_value=float(value))


def _text_value(tag: str, text: str) -> Any:
    from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2

    metadata = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
    tensor = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING,
        string_val=[text.encode("utf-8")],
        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]),
    )
    return summary_pb2.Summary.Value(tag=tag, metadata=metadata, tensor=tensor)


def _histogram_value(tag: str, values: np.ndarray, bins: int = 30) -> Any:
    from tensorboard.compat.proto import summary_pb2

    counts, edges = np.histogram(values, bins=bins)
    proto = summary_pb2.HistogramProto(
        min=float(values.min()), max=float(values.max()), num=float(values.size),
        sum=float(values.sum()), sum_squares=float(np.square(values).sum()),
        bucket_limit=[float(e) for e in edges[1:]], bucket=[float(c) for c in counts],
    )
    return summary_pb2.Summary.Value(tag=tag, histo=proto)


class TensorBoardSink(Sink):
    """Write gradwatch's per-step scalars, findings, actions and report for TensorBoard.

    Args:
        log_dir: Directory for the event files (created if needed; a new file per sink, so a
            resumed run adds to the same directory). Required unless ``writer`` is given.
        writer: An existing summary writer to log into instead (``add_scalar`` / ``add_text``;
            ``add_histogram`` for histograms). Not closed by the sink, only flushed. Defaults to
            None.
        histograms: Also write a histogram of the per-tensor gradient norms (finite ones) each
            step record. Defaults to False.
        flush_every: Flush the file every this many step records (findings, actions and the
            report flush at once). Defaults to 20.
        **kwargs: ``every``, ``max_groups``, ``strict`` (see :class:`gradwatch.sinks.Sink`).

    Raises:
        ValueError: if neither or both of ``log_dir`` and ``writer`` are given.
        gradwatch.MissingExtraError: if ``tensorboard`` is not installed (``log_dir`` only).
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | None = None,
        *,
        writer: Any = None,
        histograms: bool = False,
        flush_every: int = 20,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if (log_dir is None) == (writer is None):
            raise ValueError(
                "TensorBoardSink needs exactly one of log_dir (a directory for new event files) or "
                f"writer (an existing SummaryWriter). Received log_dir={log_dir!r}, writer={writer!r}."
            )
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.writer = writer
        self.histograms = histograms
        self.flush_every = max(1, int(flush_every))
        self._events: _EventFile | None = None
        self._pending = 0
        if self.log_dir is not None:
            require("tensorboard", "tensorboard")

    def _file(self) -> _EventFile:
        if self._events is None:
            assert self.log_dir is not None
            self._events = _EventFile(self.log_dir)
        return self._events

    def _flush(self, force: bool) -> None:
        self._pending += 1
        if force or self._pending >= self.flush_every:
            self._pending = 0
            if self._events is not None:
                self._events.flush()
            elif self.writer is not None and hasattr(self.writer, "flush"):
                self.writer.flush()

    def write_step(self, stats: StepStats, decision: Decision, monitor: Monitor) -> None:
        scalars = step_scalars(stats, decision, self.max_groups)
        norms = stats.grad_norm[stats.has_grad & np.isfinite(stats.grad_norm)]
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, stats.step)
            if self.histograms and norms.size:
                self.writer.add_histogram("gradwatch/tensor_grad_norm", norms, stats.step)
        else:
            values = [_scalar_value(tag, value) for tag, value in scalars.items()]
            if self.histograms and norms.size:
                values.append(_histogram_value("gradwatch/tensor_grad_norm", norms))
            self._file().summary(stats.step, values)
        self._flush(force=False)

    def _text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)
        else:
            self._file().summary(step, [_text_value(tag, text)])
        self._flush(force=True)

    def write_finding(self, finding: Finding, monitor: Monitor) -> None:
        self._text("gradwatch/findings", str(finding), finding.step)

    def write_action(self, action: Action, monitor: Monitor) -> None:
        self._text("gradwatch/actions", str(action), action.step)

    def write_report(self, report: Report, monitor: Monitor | None) -> None:
        # Indented by four spaces: TensorBoard renders text as Markdown, this keeps the table.
        body = "\n".join("    " + line for line in report.summary().splitlines())
        self._text("gradwatch/report", body, max(report.last_step, 0))

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None
        elif self.writer is not None and hasattr(self.writer, "flush"):
            self.writer.flush()
