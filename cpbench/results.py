"""The results of a sweep: ``results.csv`` (one row per case) and ``meta.json`` (where it ran).

``results.csv`` is written by rank 0 only, one row APPENDED per finished case, flushed and
fsync'ed, so a crash or a kill loses at most the case that was running. The header holds the
case key (:data:`cpbench.scenario.CASE_KEY`), the status, and the measured columns; region
columns are open-ended (``{region}_ms``, ``{region}_min_ms``, ``{region}_iqr_ms``...). When a row
brings a column the header lacks, the file is rewritten whole (to a temporary file, fsync'ed,
then renamed over the old one), so the file is never half old, half new.

:func:`read_results` reads such a file back; a trailing partial line (the process was killed
while writing it) is dropped with a :class:`PartialRowWarning`; any other malformed line is an
error naming the line.
"""

from __future__ import annotations

import csv
import io
import math
import os
import platform
import socket
import subprocess
import sys
import warnings
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import ResultsError
from .rundir import default_out_dir, write_meta  # noqa: F401  (re-exported: they lived here)
from .scenario import CASE_KEY, KEY_DEFAULTS

STATUS_COLUMNS = ("status", "error")
#: Work and run columns written for every case (measured ones follow, see cpbench.metrics).
CASE_COLUMNS = (
    "case",
    "tokens",
    "real_tokens",
    "real_density",
    "d_model",
    "head_dim",
    "d_state",
    "d_conv",
    "chunk_size",
    "warmup",
    "iters",
    "comm_model",
)
HEADLINE_COLUMNS = (
    "layer_ms",
    "layer_min_ms",
    "layer_iqr_ms",
    "layer_ms_samples",
    "comm_ms",
    "comm_min_ms",
    "comm_iqr_ms",
    "comm_ms_samples",
    "ref_ms",
    "ref_iqr_ms",
    "ref_ms_samples",
    "comm_bytes_fwd",
    "comm_bytes_bwd",
    "comm_bytes",
    "algbw_GBps",
    "busbw_GBps",
    "bench_busbw_GBps",
    "busbw_pct",
    "tokens_per_s",
    "peak_mem_GiB",
    "ssd_backend",
    "conv_backend",
    "n_collectives",
    "wall_s",
)
KNOWN_REGIONS = (
    "layer_fwd",
    "layer_bwd",
    "a2a_pre",
    "a2a_post",
    "state_xchg",
    "layout",
    "conv1d",
    "ssm",
    "norm_proj",
)
#: Per-iteration samples (text cells, see cpbench.metrics.format_samples).
SAMPLE_COLUMNS = ("layer_ms_samples", "comm_ms_samples", "ref_ms_samples")
#: The columns a file needs to be read as cpbench results.
REQUIRED_COLUMNS = (*CASE_KEY, "status")
#: Text columns (read as strings, empty cells as ""); every other column holds numbers.
TEXT_COLUMNS = (
    "error",
    "ssd_backend",
    "conv_backend",
    "conv_ssd_backend",
    "norm_backend",
    "comm_model",
    "packing",
    "impl",
    *SAMPLE_COLUMNS,
)
#: Key and status columns that hold words.
WORD_COLUMNS = ("scenario", "layout", "path", "pass", "strategy", "dtype", "device", "backend", "status")
#: Key columns that are numbers on every row (a case is not identified without them).
NUMERIC_KEYS = ("cp_size", "seq_len", "batch", "n_heads", "n_groups", "overlap_chunks", "world_size")


def base_columns() -> list[str]:
    cols = [*CASE_KEY, *STATUS_COLUMNS, *CASE_COLUMNS, *HEADLINE_COLUMNS]
    for r in KNOWN_REGIONS:
        cols += [f"{r}_ms", f"{r}_min_ms", f"{r}_iqr_ms"]
    return cols


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ""
    if isinstance(v, bool):
        return "true" if v else "false"
    s = str(v)
    # one physical line per row: a partial trailing line is then always detectable
    return s.replace("\r", " ").replace("\n", " | ")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ResultsWriter:
    """Append rows to a CSV as cases finish; every row is flushed and fsync'ed before returning."""

    def __init__(self, path: str | Path, columns: Sequence[str] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.columns: list[str] = list(columns) if columns is not None else base_columns()
        self.rows: list[dict[str, Any]] = []
        self._write_all()

    def _line(self, row: Mapping[str, Any]) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow([_cell(row.get(c)) for c in self.columns])
        return buf.getvalue()

    def _write_all(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "w", newline="") as f:
                f.write(self._line({c: c for c in self.columns}))
                for r in self.rows:
                    f.write(self._line(r))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:  # a full disk or a read-only folder: no half-written tmp left behind
            try:
                tmp.unlink()
            except OSError:
                pass
            raise
        _fsync_dir(self.path.parent)

    def append(self, row: Mapping[str, Any]) -> None:
        row = dict(row)
        self.rows.append(row)
        new = [k for k in row if k not in self.columns]
        if new:
            self.columns += new
            self._write_all()
            return
        with open(self.path, "a", newline="") as f:
            f.write(self._line(row))
            f.flush()
            os.fsync(f.fileno())


class PartialRowWarning(UserWarning):
    """The results file ends in a partial row (the run was killed while writing it): it was ignored."""


def read_results(path: str | Path):
    """A results CSV as a pandas DataFrame (complete rows only); see the module docstring."""
    import pandas as pd

    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ResultsError(f"{path}: cannot read: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ResultsError(f"{path}: not a text (UTF-8) file") from None
    if not text.strip():
        raise ResultsError(f"{path}: empty file, not a cpbench results CSV")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    elif len(lines) > 1:
        warnings.warn(
            f"{path}: ignoring the partial last line {len(lines)} (the run was probably interrupted "
            f"while writing it): {lines[-1][:60]!r}",
            PartialRowWarning,
            stacklevel=2,
        )
        lines.pop()
    else:
        raise ResultsError(f"{path}: the header line is incomplete: not a cpbench results CSV")
    try:
        records = list(csv.reader(lines))
    except csv.Error as e:
        raise ResultsError(f"{path}: not a valid CSV: {e}") from None
    header = records[0]
    added = [c for c in KEY_DEFAULTS if c not in header]  # results written before these key columns existed
    missing = [c for c in REQUIRED_COLUMNS if c not in header and c not in KEY_DEFAULTS]
    if missing:
        raise ResultsError(f"{path}: not a cpbench results CSV: missing column(s) {', '.join(missing)}")
    for i, rec in enumerate(records[1:], start=2):
        if len(rec) != len(header):
            raise ResultsError(f"{path}: line {i} has {len(rec)} fields, the header has {len(header)}")
    df = pd.read_csv(io.StringIO("\n".join(lines) + "\n"), keep_default_na=True)
    # replaced and added columns in one step (column by column fragments a wide frame)
    text_cols = [c for c in TEXT_COLUMNS if c in df.columns]
    fixed = {c: df[c].astype("object").fillna("").astype(str) for c in text_cols}
    fixed.update({c: [KEY_DEFAULTS[c]] * len(df) for c in added})
    df = df.assign(**fixed) if fixed else df
    _check_cells(path, df, records)
    return df.copy()


def _check_cells(path: Path, df, records: list[list[str]]) -> None:
    """Key columns must be numbers on every row; no cell may hold ``nan`` or ``inf`` (the writer
    leaves such values empty): :class:`ResultsError` naming the line, the column and the cell."""
    import pandas as pd

    header = records[0]
    for c in NUMERIC_KEYS:
        if c not in df.columns:
            continue
        bad = pd.to_numeric(df[c], errors="coerce").isna()
        if bad.any():
            i = int(bad.to_numpy().nonzero()[0][0])
            raw = records[i + 1][header.index(c)] if c in header else ""
            what = f"{raw!r} is not a number" if raw.strip() else "is empty"
            raise ResultsError(f"{path}: line {i + 2}: {c} {what} (a key column: every row needs a number)")
    for j, name in enumerate(header):
        if name in TEXT_COLUMNS or name in WORD_COLUMNS:
            continue
        for i, rec in enumerate(records[1:], start=2):
            cell = rec[j].strip().lower()
            if cell in ("nan", "-nan", "inf", "-inf", "+inf", "infinity", "-infinity"):
                raise ResultsError(
                    f"{path}: line {i}: {name} {rec[j]!r}: not a measurement (a results CSV leaves "
                    f"a value it does not have empty)"
                )


def numeric_columns(df, path: str | Path, columns=None) -> None:
    """Raise :class:`ResultsError` (one line) when one of ``columns`` (default: every column that is
    not text) holds text in an ok row: what ``report`` and ``plot`` compute with must be numbers."""
    import pandas as pd

    ok = df[df["status"] == "ok"] if "status" in df.columns else df
    for c in df.columns if columns is None else columns:
        if c not in ok.columns or c in TEXT_COLUMNS or c in WORD_COLUMNS:
            continue
        col = ok[c]
        if pd.api.types.is_numeric_dtype(col):
            continue
        num = pd.to_numeric(col, errors="coerce")
        bad = num.isna() & col.notna() & (col.astype(str).str.strip() != "")
        if bad.any():
            i = bad.to_numpy().nonzero()[0][0]
            case = ok["case"].iloc[i] if "case" in ok.columns else "?"
            raise ResultsError(f"{path}: case {case}: {c} {col.iloc[i]!r} is not a number")


# ----------------------------------------------------------------------------------------------- meta.json


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _run(cmd: list[str], cwd: str | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=cwd, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def environment() -> dict[str, Any]:
    """Host, accelerator and library versions (``None`` where absent). Never imports mamba_ssm."""
    import torch

    env: dict[str, Any] = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": None,
        "gpu_count": 0,
        "driver": None,
        "nccl": None,
    }
    if torch.cuda.is_available():
        env["gpu_count"] = torch.cuda.device_count()
        env["gpu"] = torch.cuda.get_device_name(0)
        try:
            env["nccl"] = ".".join(str(x) for x in torch.cuda.nccl.version())
        except Exception:  # a build without NCCL
            env["nccl"] = None
        env["driver"] = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        if env["driver"]:
            env["driver"] = env["driver"].splitlines()[0].strip()
    for dist in ("triton", "mamba-ssm", "causal-conv1d", "nvtx", "pandas", "rich"):
        env[dist.replace("-", "_")] = _version(dist)
    import cp_core

    # where the measured library was imported from (an A/B against an older copy names that copy)
    env["cp_core_path"] = str(Path(cp_core.__file__).resolve().parent)
    repo = str(Path(__file__).resolve().parent.parent)
    env["git_commit"] = _run(["git", "rev-parse", "HEAD"], cwd=repo)
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo)
    env["git_dirty"] = bool(dirty) if env["git_commit"] else None
    # the library's own switches and the settings that change what is measured
    env["settings"] = {
        k: v
        for k, v in sorted(os.environ.items())
        if k.startswith(("CP_CORE_", "NCCL_", "TORCH_SYMM_MEM_"))
        or k in ("MAMBA_DETERMINISTIC", "CPBENCH_SLOWDOWN", "CPBENCH_FAULT")
    }
    return env
