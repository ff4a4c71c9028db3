"""Keep one known-false Ray core line off the job's console: "the actor restart will fail" for the edit pool.

Ray's core worker (C++) writes its ERROR lines to the process's standard error itself (file descriptor 2), past
Python's ``sys.stderr`` and :mod:`logging`. On every run of the bulk job the driver's core worker writes one::

    [2026-11-30 00:27:47,076 E 7649 7649] core_worker.cc:2465: Actor with class name:
    'MapWorker(MapBatches(EditStage))' and ID: 'f8f9925c9c133965b685547701000000' has constructor arguments
    in the object store and max_restarts > 0. If the arguments in the object store go out of scope or are
    lost, the actor restart will fail. See https://github.com/ray-project/ray/issues/53727 for more details.

Where it comes from (Ray 2.60):

- ``CoreWorker::CreateActor`` (``src/ray/core_worker/core_worker.cc``) logs it, once per process, for any actor
  created with ``max_restarts != 0`` that has a constructor argument passed by reference (``ArgByRef``) or an
  inlined reference other than a detached actor's handle (ray-project/ray#53713, #57931).
- Ray Data's ``ActorPoolMapOperator._start_actor`` (``ray/data/_internal/execution/operators/
  actor_pool_map_operator.py``) creates every pool actor with ``ctx=self._data_context_ref`` and
  ``map_transformer=self._map_transformer_ref``, which ``MapOperator`` makes with ``ray.put`` whatever their
  size (``map_operator.py``, ``_map_transformer_ref`` / ``_data_context_ref``), and sets ``max_restarts=-1``
  unless the caller sets it (``_apply_default_remote_args``). So every actor pool of Ray Data 2.60 triggers the
  line, however small the UDF and its arguments (ray-project/ray#57733, open): nothing the job passes is a
  reference (``EditStage``'s constructor arguments are three small config dataclasses and an int, pickled
  inside the map transformer).

Why it is false here: ray-project/ray#53727 is about creation arguments that are *reconstructed or evicted*
(task outputs whose lineage is released once the actor first starts). Both arguments above are ``ray.put``
objects owned by the driver, which holds their references for the whole execution (cached properties of the
operator), so their primary copies stay pinned (spilled, never evicted) on the driver's node; they can only
be lost with the driver's node, and then the job and the actors (owned by the driver) are gone anyway. A
restarted actor gets them back: the chaos test (``tests/test_cluster_multinode.py``) loses a worker node with
an editing actor mid-job and the job completes, and ``tests/test_batch_console.py`` kills an editing actor's
process and the job completes with every row once.

The job keeps Ray Data's restarts (``max_restarts=-1``): turning them off is the only setting that silences the
line, and it would turn every lost node into a failed job. Raising Ray's C++ log level would hide genuine
errors. Instead :class:`NativeStderrFilter` reads file descriptor 2 through a pipe from the start of the
pipeline until that record has passed (Ray Data creates the pool first thing, so for a second or so) and
forwards everything except that one record for the edit pool's class (:data:`FALSE_RESTART_WARNING`); any
other text, including the same warning for another actor, passes unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import sys
import threading
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

#: Ray core's record for the edit pool's actors (Ray Data names the actor class ``MapWorker(<operator>)``; the
#: operator may have other map stages fused before or after ``MapBatches(EditStage)``), with its line end.
FALSE_RESTART_WARNING = re.compile(
    rb"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} E \d+ \d+\] core_worker\.cc:\d+: Actor (?:\S+ )?with class name: "
    rb"'MapWorker\((?:[^'\n]*->)?MapBatches\(EditStage\)(?:->[^'\n]*)?\)' and ID: '[0-9a-f]+' has constructor "
    rb"arguments in the object store and max_restarts > 0\. If the arguments in the object store go out of "
    rb"scope or are lost, the actor restart will fail\. See https://github\.com/ray-project/ray/issues/53727 "
    rb"for more details\.(?:\r?\n)?"
)

_LINE_END = re.compile(rb"[\r\n]")
_logged_in_process = threading.Event()  # Ray core logs the record once per process


def drop_false_restart_warning() -> contextlib.AbstractContextManager:
    """The job's filter: :class:`NativeStderrFilter` for :data:`FALSE_RESTART_WARNING` until it has passed once.

    Returns:
        The filter, or a no-op once the record has been dropped in this process (Ray core logs it once per
        process, so a second job in the same process, as in tests and benchmarks, leaves stderr alone).
    """
    if _logged_in_process.is_set():
        return contextlib.nullcontext()
    return NativeStderrFilter((FALSE_RESTART_WARNING,), once=True, on_drop=_logged_in_process.set)


class NativeStderrFilter:
    """Context manager: this process's file descriptor 2 goes through a pipe until a ``drop`` match is removed.

    A reader thread forwards what it reads to the original descriptor at once, except a last piece without a
    line end, which it holds for at most ``hold_s`` seconds (a record may come in more than one write), so a
    progress bar redrawn with ``\\r`` is forwarded as it is drawn. Ray core logs the record once per process,
    so after the first match (``once``) the original descriptor is put back at once and the rest of the pipe
    forwarded: the console is intercepted for the first seconds of the pipeline only. On exit the original
    descriptor is back in any case. POSIX only (elsewhere it does nothing); one per process at a time.

    Args:
        drop: patterns (bytes) of the text to remove, each including its line end when it has one.
        once: put the original descriptor back after the first match.
        hold_s: the longest a piece without a line end is held back, seconds.
        on_drop: called (in the reader thread) after each removal.

    Attributes:
        dropped: how many matches were removed.
    """

    def __init__(
        self,
        drop: Sequence[re.Pattern[bytes]] = (FALSE_RESTART_WARNING,),
        once: bool = True,
        hold_s: float = 0.2,
        on_drop: Callable[[], object] | None = None,
    ) -> None:
        self.drop = tuple(drop)
        self.once = once
        self.hold_s = hold_s
        self.on_drop = on_drop
        self.dropped = 0
        self._saved: int | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> NativeStderrFilter:
        if os.name != "posix":  # select() on pipes is POSIX; elsewhere the console is left as it is
            return self
        _flush_python_stderr()
        read, write = os.pipe()
        self._saved = os.dup(2)
        os.dup2(write, 2)
        os.close(write)  # fd 2 is now the pipe's only writer: putting the original back ends the reader
        self._thread = threading.Thread(
            target=self._pump, args=(read, self._saved), name="instdiff-stderr-filter", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        _flush_python_stderr()
        self._restore()
        if self._thread is not None:
            self._thread.join(timeout=5.0)  # longer only while a child process still holds the pipe
        self._thread = None
        log.debug("stderr filter: %d record(s) dropped", self.dropped)

    def _restore(self) -> None:
        """Put the original fd 2 back (once): the pipe loses its writer, the reader forwards the rest and ends."""
        with self._lock:
            if self._saved is not None:
                os.dup2(self._saved, 2)
                self._saved = None

    def _pump(self, read: int, saved: int) -> None:
        """Forward from ``read`` (the pipe) to ``saved`` (the original fd 2) until the pipe closes; close both."""
        pending = b""
        closed = False
        while not closed:
            ready, _, _ = select.select([read], [], [], self.hold_s if pending else None)
            if ready:
                chunk = os.read(read, 65536)
                closed = not chunk
                pending += chunk
            if not pending:
                continue
            pending, n = self._remove(pending)
            cut = _last_line_end(pending)
            if closed or not ready:  # the end, or a piece without a line end held long enough
                cut = len(pending)
            _write_all(saved, pending[:cut])
            pending = pending[cut:]
            if n and self.on_drop is not None:
                self.on_drop()
            if n and self.once:
                self._restore()
        os.close(read)
        os.close(saved)

    def _remove(self, data: bytes) -> tuple[bytes, int]:
        removed = 0
        for pattern in self.drop:
            data, n = pattern.subn(b"", data)
            removed += n
        self.dropped += removed
        return data, removed


def _last_line_end(data: bytes) -> int:
    """The index just past the last ``\\r`` or ``\\n`` in ``data`` (0 when it has none)."""
    ends = [m.end() for m in _LINE_END.finditer(data)]
    return ends[-1] if ends else 0


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            data = data[os.write(fd, data) :]
        except OSError:  # the console is gone: nothing left to show the text on
            return


def _flush_python_stderr() -> None:
    for stream in (sys.stderr, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
