"""A results folder: where a sweep may write, who is writing it, and whether its run finished.

Policy (what ``cpbench sweep --help`` states):

* **A run never writes over another.** ``--out DIR`` must be a new folder or an empty one; a folder
  that holds ``results.csv`` or ``meta.json`` is refused (exit 2) before any rank starts. Without
  ``--out`` the folder is ``results/<scenario>-<YYYYmmdd-HHMMSS>``, with ``-2``, ``-3``... appended
  when that name is taken.
* **One sweep per folder.** The sweep holds an advisory lock (``flock``) on ``DIR/.cpbench.lock``
  from before its first write to its exit: exclusive while the folder is checked, then shared by the
  launching process and rank 0. Another sweep on the same folder is refused with the holder's pid
  and host. The kernel drops the lock when its processes die, however they die (SIGKILL included),
  so a lock never goes stale.
* **A dead run says so.** ``meta.json`` says ``"status": "running"`` while the run goes; the
  run itself rewrites it to ``complete`` or ``aborted``, the launcher to ``interrupted`` (Ctrl-C,
  SIGTERM) or ``failed`` (a rank died), each with an ``end_reason`` (the launcher adds the cause
  when the run recorded ``aborted`` without one). A run that could not record its end (killed with
  all its processes, a full disk, a folder made read-only) leaves ``running``; the next command that
  reads the folder (``report``, ``plot``, ``compare``) finds nobody holding the lock and treats the
  run as ``killed``: it rewrites ``meta.json`` so where it can, and says so either way (never "in
  progress"). Half-written ``*.tmp`` files of a dead run are removed then too.
* **The lock names live holders only.** The lock file holds one line per holder (the launching
  process, and rank 0 of a spawned run); a reader lists those whose process is alive. Spawned
  ranks die with their launcher (a parent-death signal, :mod:`cpbench.launcher`), so a killed
  launcher leaves no rank running and no holder.
* Every command that reads results takes the folder or its ``results.csv``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import ResultsError, UserError

RESULTS_CSV = "results.csv"
META_JSON = "meta.json"
LOCK_FILE = ".cpbench.lock"
#: Files whose presence means a folder holds a run.
RUN_FILES = (RESULTS_CSV, META_JSON)
#: Suffix of the temporary files a write goes through before it is renamed into place.
TMP_SUFFIX = ".tmp"

try:  # POSIX; elsewhere folders are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None


# ----------------------------------------------------------------------------------------------- reading


def results_csv(path: str | Path) -> Path:
    """The results CSV a reading command was given: ``DIR`` -> ``DIR/results.csv``, a file as it is.

    The run's status is reconciled on the way (:func:`reconcile`). Raises :class:`ResultsError`."""
    path = Path(path)
    if path.is_dir():
        csv = path / RESULTS_CSV
        if not csv.is_file():
            raise ResultsError(f"{path}: a folder without {RESULTS_CSV}: not a cpbench results folder")
        reconcile(path)
        return csv
    if not path.exists():
        raise ResultsError(f"{path}: no such file or folder")
    reconcile(path.parent)
    return path


def run_csvs(path: str | Path) -> list[Path]:
    """The results CSVs a comparison side names: a results folder or its ``results.csv`` (one run),
    or a folder of results folders (repeated runs: every subfolder holding a ``results.csv``, in name
    order). Each run's status is reconciled on the way. Raises :class:`ResultsError`."""
    path = Path(path)
    if path.is_dir() and not (path / RESULTS_CSV).is_file():
        runs = sorted(p for p in path.iterdir() if p.is_dir() and (p / RESULTS_CSV).is_file())
        if not runs:
            raise ResultsError(
                f"{path}: neither a results folder (no {RESULTS_CSV}) nor a folder of results folders"
            )
        return [results_csv(p) for p in runs]
    return [results_csv(path)]


def read_meta(folder: str | Path) -> dict[str, Any] | None:
    """``meta.json`` of a results folder, or ``None`` when absent or unreadable."""
    try:
        meta = json.loads((Path(folder) / META_JSON).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def reconcile(folder: str | Path) -> dict[str, Any] | None:
    """``meta.json`` of ``folder`` as a reader should take it. A run that says ``running`` while no
    live process holds the folder's lock died without a word: it is ``killed`` (rewritten so on disk
    where the folder can be written; the returned meta says so either way), and the ``*.tmp`` files
    its interrupted writes left are removed."""
    folder = Path(folder)
    meta = read_meta(folder)
    if holder(folder) is not None:
        return meta
    remove_tmp_files(folder)
    if meta is None or meta.get("status") != "running":
        return meta
    last = lock_text(folder)
    who = f" (last holder: {'; '.join(last)})" if last else ""
    return mark_ended(
        folder,
        "killed",
        "the run ended without recording it (killed, or it could not write: disk full, read-only "
        f"folder){who}; marked when the folder was next read",
    )


def mark_ended(folder: str | Path, status: str, reason: str) -> dict[str, Any] | None:
    """Record how a run ended: ``status`` and ``end_reason`` (and the row count) when ``meta.json``
    still says ``running``; else, for a run that did not complete, ``reason`` is added to its
    ``end_reason`` (what the launcher knows of a rank's death beside what rank 0 saw). Returns
    the meta as updated; writing it is best effort (a full disk or a read-only folder keeps the file
    as it was, the returned meta is updated all the same)."""
    folder = Path(folder)
    meta = read_meta(folder)
    if meta is None:
        return meta
    earlier = str(meta.get("end_reason") or "")
    if meta.get("status") == "running":
        meta.update(status=status, end_reason=reason, n_rows=count_rows(folder / RESULTS_CSV))
    elif meta.get("status") != "complete" and reason not in earlier:
        meta["end_reason"] = f"{earlier}; {reason}" if earlier else reason
    else:
        return meta
    meta.setdefault("end_time", datetime.now().isoformat(timespec="seconds"))
    try:
        write_meta(folder / META_JSON, meta)
    except OSError:
        pass
    return meta


def remove_tmp_files(folder: str | Path) -> list[Path]:
    """Remove the half-written ``results.csv.tmp`` / ``meta.json.tmp`` of a run that died while writing
    them (call it only when no process holds the folder). Best effort; returns what was removed."""
    out = []
    for name in RUN_FILES:
        tmp = Path(folder) / (name + TMP_SUFFIX)
        try:
            tmp.unlink()
        except OSError:
            continue
        out.append(tmp)
    return out


def write_meta(path: str | Path, meta: Mapping[str, Any]) -> None:
    """Write ``meta.json`` atomically: to ``meta.json.tmp``, fsync'ed, renamed over the old file. A
    failed write (disk full, read-only folder) raises and leaves neither a partial file nor the tmp."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    text = json.dumps(meta, indent=2, sort_keys=False, default=str) + "\n"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def count_rows(csv: Path) -> int:
    """Complete data rows of a results CSV (0 when unreadable)."""
    try:
        text = csv.read_text()
    except (OSError, UnicodeDecodeError):
        return 0
    return max(0, text.count("\n") - 1)


def why_no_rows(csv: Path) -> str:
    """One line on why a results CSV holds no row, from the run's ``meta.json``."""
    meta = reconcile(csv.parent)
    if meta is None:
        return f"{csv}: no case finished (no {META_JSON} beside it to say why)"
    status = meta.get("status")
    started = meta.get("start_time", "?")
    n = meta.get("n_cases", "?")
    if status == "running":
        who = holder(csv.parent) or "another process"
        return f"{csv}: the run is still going ({who}); none of its {n} cases has finished yet"
    if status == "killed":
        return f"{csv}: the run started {started} was killed or crashed before any of its {n} cases finished"
    if status in ("interrupted", "failed", "aborted"):
        reason = meta.get("end_reason", "")
        return f"{csv}: the run started {started} was {status} before any case finished" + (
            f": {reason}" if reason else ""
        )
    if n == 0:
        return f"{csv}: the scenario had no cases"
    return f"{csv}: no row (meta.json says status {status!r}, {n} cases)"


def run_status_line(folder: str | Path) -> str | None:
    """A line on a run that did not complete (``None`` for a complete run or no ``meta.json``); a run
    nobody holds any more is never "running" here (:func:`reconcile`)."""
    meta = reconcile(folder)
    if meta is None or meta.get("status") in (None, "complete"):
        return None
    status = meta["status"]
    rows = count_rows(Path(folder) / RESULTS_CSV)
    line = f"run {status}: {rows} of {meta.get('n_cases', '?')} cases have a row"
    if status == "running":
        line += f" (still going: {holder(folder) or 'held'})"
    elif meta.get("end_reason"):
        line += f"; {meta['end_reason']}"
    return line


# ----------------------------------------------------------------------------------------------- writing


def prepare_plot_dir(folder: str | Path, flag: str) -> Path:
    """Create a folder for output files (plots); :class:`UserError` when it cannot be written."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder}: exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".cpbench-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{flag} {folder}: cannot write there: {e.strerror or e}") from None
    return folder


def default_out_dir(scenario_name: str, root: str | Path = "results", now: datetime | None = None) -> Path:
    """``root/<scenario>-<YYYYmmdd-HHMMSS>``, suffixed ``-2``, ``-3``... when that folder exists."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{scenario_name}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


class RunLock:
    """The advisory lock of a results folder held by a sweep (see the module docstring)."""

    def __init__(self, folder: Path, fd: int):
        self.folder = folder
        self._fd: int | None = fd

    def share(self) -> None:
        """Downgrade to a shared lock, so rank 0 can hold the folder too (readers test for exclusive)."""
        if fcntl is not None and self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_SH)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None


def _open_lock(folder: Path) -> int:
    return os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)


def lock_text(folder: str | Path) -> list[str]:
    """The holders the lock file names, one per line (``pid P on HOST since T``), live or not."""
    try:
        text = (Path(folder) / LOCK_FILE).read_text(errors="replace")
    except OSError:
        return []
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def _alive(line: str) -> bool:
    """Whether the process a lock line names still exists (always true for another host's process)."""
    m = re.match(r"pid (\d+) on (\S+)", line)
    if m is None or m.group(2) != socket.gethostname():
        return True
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def holder(folder: str | Path) -> str | None:
    """Who holds ``folder``'s lock (``"pid P on HOST since T"``, its live holders joined by ``; ``), or
    ``None`` when nobody does."""
    folder = Path(folder)
    if fcntl is None or not (folder / LOCK_FILE).exists():
        return None
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            live = [ln for ln in lock_text(folder) if _alive(ln)]
            return "; ".join(live) or "a process the lock file does not name"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _holder_line(role: str = "") -> bytes:
    return f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}{role}\n".encode()


def hold_shared(folder: str | Path) -> RunLock | None:
    """A shared hold on a folder the launcher has locked (rank 0 of a spawned run), its line added to
    the lock file; ``None`` if impossible."""
    if fcntl is None:
        return None
    try:
        fd = os.open(Path(folder) / LOCK_FILE, os.O_RDWR | os.O_APPEND)
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return None
    try:
        os.write(fd, _holder_line(" (rank 0)"))
    except OSError:
        pass
    return RunLock(Path(folder), fd)


def prepare_out_dir(folder: str | Path, flag: str = "--out") -> RunLock:
    """Create and lock a folder for a new run; :class:`UserError` (one line, exit 2) when it cannot be:
    a file in the way, no permission, a read-only or pseudo file system, an earlier run, a sweep running."""
    folder = Path(folder)
    where = f"{flag} {folder}"
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{where}: exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{where}: cannot create the folder: {e.strerror or e}") from None
    try:
        fd = _open_lock(folder)
    except OSError as e:
        raise UserError(f"{where}: cannot write there: {e.strerror or e}") from None
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            text = holder(folder) or "another process"
            raise UserError(f"{where}: another sweep is writing this folder ({text})") from None
        except OSError as e:  # a file system without locks
            os.close(fd)
            raise UserError(f"{where}: cannot lock the folder: {e.strerror or e}") from None
    lock = RunLock(folder, fd)
    earlier = [f for f in RUN_FILES if (folder / f).exists()]
    if earlier:
        lock.release()
        raise UserError(
            f"{where} holds an earlier run ({', '.join(earlier)}); cpbench never writes over a run: "
            f"choose a new folder (without --out, a new timestamped one is made)"
        )
    try:  # the lock file says who holds it; writing it also proves the folder is writable
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_line(), 0)
        probe = folder / f".cpbench-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        lock.release()
        raise UserError(f"{where}: cannot write there: {e.strerror or e}") from None
    return lock
