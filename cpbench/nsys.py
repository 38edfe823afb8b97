"""Nsight Systems: the ``nsys profile`` command of a sweep, and ``nvtx_gpu_proj_sum`` read back.

``cpbench sweep --profile nsys`` prints the command that profiles the same sweep and stops (exit 0);
``--exec`` becomes that command. Under it (``CPBENCH_UNDER_NSYS=1``, which the command sets in the
profiled process) each case's measured iterations run between ``cudaProfilerStart/Stop`` inside an
NVTX range ``cpbench:case N: ...``, and every region is an NVTX range ``cpbench:<region>``
(``torch.cuda.nvtx``: the ranges Nsight Systems 2023.4.4 records), so

    nsys profile -s none --cpuctxsw=none -t cuda,nvtx -c cudaProfilerApi --capture-range-end=<end> ...

captures the measured iterations and nothing else: no warmup, no Triton autotuning, no CPU sampling
or context switches (with them one case made a 2.2 GB capture; without, 1.9 MB). ``<end>`` is
``stop`` for a sweep of one case and ``repeat`` for several (nsys then writes one report per case,
``cpbench.1.nsys-rep``, ``cpbench.2.nsys-rep``, ... in the order the cases ran), so that every case
is captured rather than only the first.

``cpbench nsys-import REPORT.nsys-rep`` runs ``nsys stats --report nvtx_gpu_proj_sum --format csv``
on a report (or reads a CSV already exported that way) and turns the NVTX ranges named
``cpbench:<region>`` into the region columns of ``results.csv``: ``{region}_ms`` is the region's total
GPU-projected time divided by the number of measured iterations (the instances of ``layer_fwd``),
i.e. the mean per iteration, of the sum of its occurrences; ``{region}_count`` is the number of
instances per iteration. Column names are matched loosely (nsys versions differ): the range name is
``Range`` or ``Name``; times are ``Total Proj Time`` / ``Proj Med`` / ... with a unit in parentheses
(ns by default); instances are ``Range Instances`` or ``Instances``; a ``domain:`` prefix on a range
name is removed.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from .errors import UserError

UNDER_NSYS_ENV = "CPBENCH_UNDER_NSYS"
_UNITS = {"ns": 1e-9, "us": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0}


def profile_command(out_dir: Path, program: list[str], n_cases: int) -> list[str]:
    """``nsys profile ... <program>``; ``program`` is the command that runs the sweep."""
    end = "stop" if n_cases <= 1 else "repeat"
    return [
        "nsys",
        "profile",
        "-s",
        "none",
        "--cpuctxsw=none",
        "-t",
        "cuda,nvtx",
        "-c",
        "cudaProfilerApi",
        f"--capture-range-end={end}",
        "--force-overwrite=true",
        f"--env-var={UNDER_NSYS_ENV}=1",
        "-o",
        str(Path(out_dir) / "cpbench"),
        *program,
    ]


def format_command(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def exec_under_nsys(cmd: list[str]) -> None:
    """Replace this process by ``cmd`` (an ``nsys profile`` command); a UserError if nsys is absent."""
    if shutil.which(cmd[0]) is None:
        raise UserError(
            "--exec: nsys is not on PATH (install Nsight Systems, or run the printed command where it is)"
        )
    os.environ[UNDER_NSYS_ENV] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(cmd[0], cmd)


def under_nsys() -> bool:
    """This process runs under the nsys command (which sets ``CPBENCH_UNDER_NSYS=1``), or under an nsys
    session of someone's own command line (nsys names its session in the profiled process)."""
    return os.environ.get(UNDER_NSYS_ENV) == "1" or "NSYS_PROFILING_SESSION_ID" in os.environ


# ----------------------------------------------------------------------------------------------- import


def _norm(name: str) -> str:
    return re.sub(r"[^a-z]", "", name.lower().split("(")[0])


def _unit(name: str) -> float:
    m = re.search(r"\(([^)]*)\)", name)
    return _UNITS.get(m.group(1).strip(), 1e-9) if m else 1e-9


def _float(v: str) -> float:
    v = (v or "").strip().replace(",", "")
    try:
        return float(v)
    except ValueError:
        return float("nan")


def region_name(raw: str) -> str | None:
    """``cpbench:a2a_pre`` / ``:a2a_pre`` / ``a2a_pre`` -> ``a2a_pre``; ``None`` for the case ranges."""
    name = raw.strip()
    if re.match(r"^(?:[\w.-]*:)?case \d+:", name):
        return None
    if ":" in name:
        name = name.split(":", 1)[1] if not name.startswith(":") else name[1:]
    return name.strip() or None


def parse_nvtx_gpu_proj_sum(text: str, source: str = "<csv>") -> list[dict[str, Any]]:
    """Rows ``{"range", "total_s", "instances", "med_s"}`` of an ``nvtx_gpu_proj_sum`` CSV export."""
    lines = text.splitlines()
    start = None
    for i, line in enumerate(lines):
        cells = [_norm(c) for c in next(csv.reader([line]), [])]
        if ("range" in cells or "name" in cells) and any(
            c.startswith(("totalproj", "projavg", "projmed")) for c in cells
        ):
            start = i
            break
    if start is None:
        raise UserError(
            f"{source}: no nvtx_gpu_proj_sum table found (expected a CSV header with Range and "
            f"Total Proj Time columns, as written by `nsys stats --report nvtx_gpu_proj_sum --format csv`)"
        )
    body = []
    for line in lines[start:]:
        if not line.strip():
            break
        body.append(line)
    reader = csv.reader(io.StringIO("\n".join(body)))
    header = next(reader)
    idx = {_norm(h): (i, _unit(h)) for i, h in enumerate(header)}

    def col(*names):
        for n in names:
            if n in idx:
                return idx[n]
        return None

    c_range = col("range", "name")
    c_total = col("totalprojtime", "totalprojectedtime", "totalproj")
    c_inst = col("rangeinstances", "instances", "numranges", "count")
    c_med = col("projmed", "projmedian", "medproj")
    c_avg = col("projavg", "projmean", "avgproj")
    if c_range is None or (c_total is None and c_avg is None):
        raise UserError(
            f"{source}: the nvtx_gpu_proj_sum header lacks a range name or a projected time column"
        )
    rows = []
    for rec in reader:
        if len(rec) <= c_range[0]:
            continue
        inst = _float(rec[c_inst[0]]) if c_inst and len(rec) > c_inst[0] else float("nan")
        if c_total is not None and len(rec) > c_total[0]:
            total = _float(rec[c_total[0]]) * c_total[1]
        else:
            total = _float(rec[c_avg[0]]) * c_avg[1] * inst
        med = _float(rec[c_med[0]]) * c_med[1] if c_med and len(rec) > c_med[0] else float("nan")
        rows.append({"range": rec[c_range[0]], "total_s": total, "instances": inst, "med_s": med})
    return rows


def to_region_columns(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The results.csv region columns from parsed rows (see the module docstring)."""
    per: dict[str, dict[str, float]] = {}
    for r in rows:
        name = region_name(r["range"])
        if name is None:
            continue
        p = per.setdefault(name, {"total_s": 0.0, "instances": 0.0})
        p["total_s"] += r["total_s"]
        p["instances"] += r["instances"] if r["instances"] == r["instances"] else 0.0
    iters = per.get("layer_fwd", {}).get("instances", 0.0)
    out: dict[str, float] = {"iterations": iters}
    for name, p in per.items():
        n = iters or p["instances"] or 1.0
        out[f"{name}_ms"] = p["total_s"] / n * 1e3
        out[f"{name}_count"] = p["instances"] / n
    return out


def nsys_command() -> list[str]:
    """How to run nsys here: ``CPBENCH_NSYS`` (e.g. ``bash .../nsys_host.sh nsys`` on a machine where the
    host part lives beside the CLI), else ``nsys`` on PATH."""
    cmd = shlex.split(os.environ.get("CPBENCH_NSYS", "")) or ["nsys"]
    if shutil.which(cmd[0]) is None:
        raise UserError(
            "reading a report needs nsys (on PATH, or the command in CPBENCH_NSYS); or pass the CSV that "
            "`nsys stats --report nvtx_gpu_proj_sum --format csv --output -` printed"
        )
    return cmd


def stats_csv(report: Path, name: str = "nvtx_gpu_proj_sum") -> str:
    """``nsys stats --report NAME --format csv`` of a report, as text."""
    cmd = [*nsys_command(), "stats", "--report", name, "--format", "csv", "--output", "-"]
    cmd += ["--force-export=true", str(report)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise UserError(f"{report}: nsys stats failed ({res.returncode}): {res.stderr.strip()[-400:]}")
    return res.stdout


def parse_kern_sum(text: str, source: str = "<csv>") -> dict[str, int]:
    """Kernel instances by name from ``nsys stats --report cuda_gpu_kern_sum --format csv``."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        cells = [_norm(c) for c in next(csv.reader([line]), [])]
        if "instances" in cells and "name" in cells:
            rows = list(csv.DictReader(io.StringIO("\n".join(ln for ln in lines[i:] if ln.strip()))))
            return {r["Name"]: int(float(r["Instances"])) for r in rows if r.get("Name")}
    raise UserError(f"{source}: no cuda_gpu_kern_sum table found (a CSV header with Instances and Name)")


def short_kernel(name: str) -> str:
    """A kernel's name without ``void``, namespaces, template and call arguments (nsys and the torch
    profiler spell templates differently)."""
    n = name.strip()
    if n.startswith("void "):
        n = n[5:]
    depth, out = 0, []
    for ch in n:  # drop <...> and (...) at any depth
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth = max(0, depth - 1)
        elif depth == 0:
            out.append(ch)
    return "".join(out).split("::")[-1].strip() or n


def agreement(cols: dict[str, float], row: dict[str, Any], tolerance: float = 0.10, min_ms: float = 0.2):
    """Rows ``(region, nsys ms, events median ms, events min ms, ratio, verdict)`` comparing
    :func:`to_region_columns` with the CUDA-event region times of the same run's results.csv row.
    ``verdict``: ``ok`` within ``tolerance``, ``DIFF`` outside it, ``small`` (not judged) under
    ``min_ms``, ``no GPU ops`` where nsys projected nothing: a range whose kernels are launched by
    another thread (``layer_bwd``: autograd runs the backward on its own thread) has none."""
    from cp_core import regions as R

    names = [R.A2A_PRE, R.LAYOUT, R.CONV1D, R.SSM, R.A2A_POST, R.NORM_PROJ, R.STATE_XCHG]
    known = ["layer_fwd", "layer_bwd", *names, *(n + "_bwd" for n in names)]
    out = []
    for reg in known:
        ev = row.get(f"{reg}_ms")
        if ev is None or ev != ev:
            continue
        ns = cols.get(f"{reg}_ms", float("nan"))
        ratio = ns / ev if ev else float("nan")
        if ns != ns:
            verdict = "no GPU ops"
        elif ev < min_ms:
            verdict = "small"
        else:
            verdict = "ok" if abs(ratio - 1) <= tolerance else "DIFF"
        out.append((reg, ns, ev, row.get(f"{reg}_min_ms", float("nan")), ratio, verdict))
    return out


def import_report(path: str | Path) -> dict[str, float]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.suffix in (".nsys-rep", ".qdrep", ".sqlite"):
        text = stats_csv(path)
    else:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: cannot read: {e}") from None
    return to_region_columns(parse_nvtx_gpu_proj_sum(text, str(path)))
