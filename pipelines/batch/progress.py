"""The job's console while it runs: one instdiff progress line per interval, and Ray's own output kept sober.

The progress line counts what the run has committed to its output (its ``part-<run_id>-*`` files, which appear
whole: :mod:`pipelines.batch.sink`), so it reports rows that are really written, on any cluster and any
storage, without a channel from the workers::

    progress: 48/64 rows written (46 ok, 2 error), 1.9 rows/s, ETA 8 s

Ray Data's progress bars are shown on a terminal only (``ray.progress_bars``); off a terminal (``ray job
submit``, CI, a log file) they are off and this line is the progress report.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import schema as S
from pipelines import storage

log = logging.getLogger(__name__)


def stdout_is_terminal() -> bool:
    """Whether this process's stdout is an interactive terminal (where progress bars can redraw in place)."""
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def format_eta(seconds: float | None) -> str:
    """``"8 s"``, ``"3 min 20 s"``, ``"1 h 05 min"``; ``"?"`` when unknown."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class ProgressLine:
    """A driver thread that logs the run's committed rows every ``interval_s`` seconds (and once at the end).

    Args:
        fs: the output filesystem.
        path: the output folder inside ``fs``.
        run_id: the run whose parts are counted.
        total: rows this run is to write (input rows less those skipped).
        interval_s: seconds between lines.
    """

    def __init__(self, fs: Any, path: str, run_id: str, total: int, interval_s: float = 15.0) -> None:
        self.fs, self.path, self.prefix = fs, path, f"part-{run_id}-"
        self.total = total
        self.interval_s = interval_s
        self.ok = 0
        self.error = 0
        self._seen: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = time.perf_counter()

    @property
    def done(self) -> int:
        """Rows committed so far."""
        return self.ok + self.error

    def poll(self) -> None:
        """Count the rows of parts committed since the last poll (a part not readable yet is counted later)."""
        try:
            files = [f for f in storage.list_files(self.fs, self.path) if f.rsplit("/", 1)[-1].startswith(self.prefix)]
        except OSError as exc:
            log.debug("progress: cannot list the output: %s", exc)
            return
        for f in files:
            if f in self._seen:
                continue
            try:
                status = pq.read_table(f, columns=[S.STATUS], filesystem=self.fs)[S.STATUS].to_pylist()
            except (pa.ArrowException, OSError):
                continue
            self._seen.add(f)
            ok = sum(1 for s in status if s == S.STATUS_OK)
            self.ok += ok
            self.error += len(status) - ok

    def line(self) -> str:
        """The progress line for the counts so far."""
        elapsed = time.perf_counter() - self._t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else None
        return (
            f"progress: {self.done}/{self.total} rows written ({self.ok} ok, {self.error} error), "
            f"{rate:.2f} rows/s, ETA {format_eta(eta) if self.done < self.total else '0 s'}"
        )

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()
            log.info("%s", self.line())

    def __enter__(self) -> ProgressLine:
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="instdiff-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 5)


def configure_ray_console(progress_bars: bool) -> dict[str, Any]:
    """Set Ray Data's console for this run; returns the previous settings for :func:`restore_ray_console`.

    - Progress bars only on a terminal and only when ``progress_bars`` (``ray.progress_bars``). Off a terminal
      Ray Data 2.60 would log a multi-line snapshot of every operator every 10 s; the job's own
      :class:`ProgressLine` replaces it.
    - Ray Data's hint "Progress bars disabled. To enable, set ..." is not printed when the job turned the bars
      off on purpose (its ``log_once`` key is taken).
    - Ray Data's "the cluster has no available CPUs ... will hang" warning is checked again when it wraps the
      rows a write has already finished (``materialize``), while the finished pool's actors still hold their
      CPUs; the job checks the same thing before it starts, with its real numbers
      (:func:`pipelines.batch.ray_cluster.check_resources`), so Ray's late check is not repeated (its
      ``log_once`` key is taken).

    Args:
        progress_bars: the config's ``ray.progress_bars``.

    Returns:
        The ``DataContext`` fields changed, with their earlier values.
    """
    import ray.data
    from ray.util.debug import log_once

    ctx = ray.data.DataContext.get_current()
    previous = {"enable_progress_bars": ctx.enable_progress_bars}
    ctx.enable_progress_bars = bool(progress_bars) and stdout_is_terminal()
    if not ctx.enable_progress_bars:
        log_once("ray_data_progress_manager_disabled")
    log_once("cpu_warning")
    return previous


def restore_ray_console(previous: dict[str, Any]) -> None:
    """Put back the ``DataContext`` fields :func:`configure_ray_console` changed."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    for name, value in previous.items():
        setattr(ctx, name, value)
