"""Layout microbenchmark (GPU kernels): the local work of pre_conv_ssm + post_conv_ssm, the collective left out.

``python -m cpbench.layout_bench [--nemo PATH/TO/context_parallel/mamba.py] [--out CSV] [--dry-run]``

It measures the copies and gathers on a GPU (the defaults are GPU-sized). Without a CUDA device it
refuses (exit 2) unless ``--device cpu`` is given; on a CPU use small sizes, e.g. ``--device cpu
--seq-len 4096 --shape 8,4,2,4`` (seconds). ``--dry-run`` lists the cases and stops.

One process plays rank 0 of a CP group of ``cp`` ranks. The all-to-all is replaced by nothing at
all (the received buffer aliases the sent one: ``LocalGroup(copy=False)``), so what is timed is every
copy, permutation and gather each path does around it. Paths:

``fused``       cp_core's default: one pack, one row gather each way (``[z|x|B|C|dt]`` as in the seed API)
``fused_noz``   the same without ``z`` (what :class:`~cp_core.mixer.Mamba2Mixer` sends)
``seed``        cp_core's seed-semantics path (five all-to-alls, per-chunk reorders)
``nemo``        NeMo AutoModel's ``context_parallel/mamba.py`` module, loaded from ``--nemo``, with its
                ``_all_to_all`` replaced by the identity and a stand-in group object

The fused paths here always take the row gather (``cp_core.plan.RUNS_MAX = 0``: no plan is sent in pieces): with the
collective left out, a received buffer exists only for the one-message exchange. The layer's default
exchange for BSHD and few documents sends the pieces straight into their rows (no gather; one pass
each direction is left, the pack or the unpack); the sweep measures that with the collective in.

``floor``: two passes (read + write) over the pre bytes and two over the post bytes, at the
device-to-device copy bandwidth measured in the same run (each direction must at least pack a
send buffer and reorder what arrives). Times: median of ``--iters`` after ``--warmup`` (CUDA events
on GPU, perf_counter on CPU).

Every ``(seq_len, cp)`` is checked before anything runs: ``seq_len`` must be a multiple of
``2 * cp``, and a pack of ``seq_len`` tokens holds at most ``seq_len / (2 * cp)`` documents (each a
multiple of ``2 * cp`` tokens). Document counts of the default ``--docs`` that do not fit a length
are left out for that length (and said so); counts given explicitly that do not fit are an error
(exit 2). Rows go out as they are computed: to ``--out`` (header first, each row flushed) and to
stdout as CSV lines under a header.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import sys

import torch

from cp_core import plan as plan_mod
from cp_core.comm import LocalGroup
from cp_core.mamba_cp import MambaContextParallel

from .timing import median_ms


def _timer(device: torch.device):
    return lambda fn, warmup, iters: median_ms(fn, device, warmup, iters)


def copy_bandwidth(device: torch.device, nbytes: int, timer) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting read + write."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src), 3, 20)
    return 2 * nbytes / (ms * 1e-3)


DEFAULT_DOCS = "0,1,8,64,512"
COLUMNS = (
    "cp",
    "seq_len",
    "docs",
    "path",
    "pre_ms",
    "post_ms",
    "total_ms",
    "floor_ms",
    "x_floor",
    "same_output",
)


def max_docs(seq_len: int, granule: int) -> int:
    """Most documents a pack of ``seq_len`` tokens holds when every document is ``granule`` tokens or more."""
    return seq_len // granule


def pack_lengths(total: int, n_docs: int, granule: int, seed: int) -> list[int]:
    """``n_docs`` document lengths (multiples of ``granule``) summing to ``total``, drawn from a seeded split."""
    units = total // granule
    if not 1 <= n_docs <= units:
        raise ValueError(f"{n_docs} documents do not fit {total} tokens in multiples of {granule}")
    rnd = random.Random(seed)
    cuts = sorted(rnd.sample(range(1, units), n_docs - 1)) if n_docs > 1 else []
    bounds = [0, *cuts, units]
    return [granule * (b - a) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


class _FakeGroup:
    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def size(self):
        return self._size

    def rank(self):
        return self._rank


def load_nemo(path: str):
    spec = importlib.util.spec_from_file_location("nemo_mamba_cp", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod._all_to_all = lambda x, group: x  # leave the collective out, as for the other paths
    return mod


def bench_case(cp, seq_len, n_docs, shape, dtype, device, timer, warmup, iters, nemo=None, bw=None):
    nh, hd, ng, ds = shape
    d_inner = nh * hd
    width = 2 * d_inner + 2 * ng * ds + nh
    if n_docs is None:
        proj = torch.randn(1, seq_len // cp, width, device=device, dtype=dtype)
        cu = None
    else:
        cu = torch.tensor([0, *pack_lengths(seq_len, n_docs, 2 * cp, seed=n_docs)], dtype=torch.int32).cumsum(
            0
        )
        cu = cu.to(torch.int32).to(device)
        proj = torch.randn(seq_len // cp, width, device=device, dtype=dtype)
    y_shape = (*proj.shape[:-2], seq_len, d_inner // cp)
    y = torch.randn(y_shape, device=device, dtype=dtype)
    group = LocalGroup(0, cp, copy=False)
    rows = []
    elem = proj.element_size()
    pre_bytes = proj.numel() * elem
    post_bytes = y.numel() * elem
    floor = None if bw is None else (2 * 2 * pre_bytes + 2 * 2 * post_bytes) / bw * 1e3
    paths = {
        "fused": (MambaContextParallel(group, nh, hd, ng, ds, None), proj, True),
        "fused_noz": (MambaContextParallel(group, nh, hd, ng, ds, None), proj[..., d_inner:], False),
        "seed": (MambaContextParallel(group, nh, hd, ng, ds, None, fused=False), proj, True),
    }
    if nemo is not None:
        paths["nemo"] = (nemo.MambaContextParallel(_FakeGroup(0, cp), nh, hd, ng, ds, None), proj, True)
    want = None
    for name, (ctx, inp, with_z) in paths.items():
        kw = {} if name == "nemo" or with_z else {"with_z": False}
        got = ctx.pre_conv_ssm(inp, cu, **kw)
        if (
            with_z
        ):  # every path that takes [z|x|B|C|dt] must return the same tensor (the received data is fake
            want = got if want is None else want  # but identical for all paths, so this checks the semantics)
            same = torch.equal(got, want) and torch.equal(
                ctx.post_conv_ssm(y, cu), paths["fused"][0].post_conv_ssm(y, cu)
            )
        else:
            same = torch.equal(got, want[..., d_inner // cp :])
        pre = timer(lambda ctx=ctx, inp=inp, kw=kw: ctx.pre_conv_ssm(inp, cu, **kw), warmup, iters)
        post = timer(lambda ctx=ctx: ctx.post_conv_ssm(y, cu), warmup, iters)
        fl = floor
        if name == "fused_noz" and bw is not None:
            fl = (2 * 2 * inp.numel() * elem + 2 * 2 * post_bytes) / bw * 1e3
        rows.append(
            dict(
                cp=cp,
                seq_len=seq_len,
                docs=n_docs or 0,
                path=name,
                pre_ms=pre,
                post_ms=post,
                total_ms=pre + post,
                floor_ms=fl,
                x_floor=(pre + post) / fl if fl else float("nan"),
                same_output=same,
            )
        )
    return rows


def plot(csv: str, png: str) -> None:
    """Bars of pre+post time per path for every case, with the copy floor marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.read_csv(csv)
    paths = list(dict.fromkeys(df["path"]))
    lengths = sorted(df["seq_len"].unique())
    fig, axes = plt.subplots(len(lengths), 1, figsize=(11, 3.6 * len(lengths)), squeeze=False)
    for ax, L in zip(axes[:, 0], lengths, strict=True):
        sub = df[df["seq_len"] == L]
        cases = list(dict.fromkeys(zip(sub["cp"], sub["docs"], strict=True)))
        w = 0.8 / len(paths)
        for i, p in enumerate(paths):
            vals = [
                sub[(sub.cp == c) & (sub.docs == d) & (sub.path == p)]["total_ms"].median() for c, d in cases
            ]
            ax.bar([k + i * w for k in range(len(cases))], vals, w, label=p)
        floors = [sub[(sub.cp == c) & (sub.docs == d)]["floor_ms"].iloc[0] for c, d in cases]
        ax.scatter(
            [k + 0.4 - w / 2 for k in range(len(cases))],
            floors,
            marker="_",
            s=400,
            color="k",
            label="copy floor",
        )
        ax.set_xticks([k + 0.4 - w / 2 for k in range(len(cases))])
        ax.set_xticklabels(
            [f"cp {c}\n{'BSHD' if d == 0 else f'{d} docs'}" for c, d in cases], fontsize="x-small"
        )
        ax.set_yscale("log")
        ax.set_ylabel("pre + post local work, ms")
        ax.set_title(f"L = {L}", fontsize="medium")
        ax.legend(fontsize="x-small", ncol=len(paths) + 1)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def _usage(message: str) -> SystemExit:
    """Print a one-line error; the SystemExit to raise (exit code 2, as argparse's own errors)."""
    print(f"layout_bench: error: {message}", file=sys.stderr)
    return SystemExit(2)


def _ints(flag: str, text: str, lo: int) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise _usage(f"{flag} {text!r}: expected comma-separated integers") from None
    if not vals or any(v < lo for v in vals):
        raise _usage(f"{flag} {text!r}: expected integers >= {lo}")
    return vals


def plan_cases(lengths, cps, docs, explicit_docs: bool):
    """``(cases, notes)``: the ``(seq_len, cp, docs)`` to run; raises SystemExit on impossible input."""
    cases, notes = [], []
    for L in lengths:
        for cp in cps:
            if L % (2 * cp):
                raise _usage(f"--seq-len {L} is not a multiple of 2 * cp = {2 * cp}")
            most = max_docs(L, 2 * cp)
            for d in docs:
                if d > most:
                    if explicit_docs:
                        raise _usage(
                            f"--docs {d} does not fit seq_len {L} at cp {cp} "
                            f"(at most {most} documents of {2 * cp}-token multiples)"
                        )
                    notes.append(f"seq_len {L}, cp {cp}: {d} documents left out (at most {most})")
                    continue
                cases.append((L, cp, d))
    return cases, notes


def _csv_line(values) -> str:
    return ",".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in values)


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m cpbench.layout_bench",
        description=__doc__.splitlines()[0]
        + ". GPU-sized defaults; on a CPU give --device cpu and small sizes (--seq-len 4096 --shape 8,4,2,4).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--device", default="cuda", help="cuda, or cpu (small sizes there)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--cp", default="2,4,8", help="CP sizes")
    ap.add_argument("--seq-len", default="32768,131072", help="global tokens per sequence or pack")
    ap.add_argument(
        "--docs",
        default=None,
        help=f"0 = BSHD [1, L], else packed THD with that many documents (default {DEFAULT_DOCS}, "
        "the counts that fit each length)",
    )
    ap.add_argument("--shape", default="128,64,8,128", help="n_heads,head_dim,n_groups,d_state")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--nemo", default=None, help="path to NeMo AutoModel's context_parallel/mamba.py")
    ap.add_argument("--out", default=None, help="write the rows as CSV here, each as it is computed")
    ap.add_argument(
        "--plot", default=None, metavar="PNG", help="also draw the bars (from --out, or --from-csv)"
    )
    ap.add_argument("--from-csv", default=None, help="only plot this CSV of an earlier run")
    ap.add_argument("--dry-run", action="store_true", help="check the arguments, list the cases and stop")
    a = ap.parse_args(argv)
    if a.from_csv:
        plot(a.from_csv, a.plot or a.from_csv.replace(".csv", ".png"))
        return 0
    try:
        device = torch.device(a.device)
    except RuntimeError:
        raise _usage(f"--device {a.device!r}: expected cuda or cpu") from None
    dtype = getattr(torch, a.dtype)
    shape = tuple(_ints("--shape", a.shape, 1))
    if len(shape) != 4:
        raise _usage(f"--shape {a.shape!r}: expected n_heads,head_dim,n_groups,d_state")
    cases, notes = plan_cases(
        _ints("--seq-len", a.seq_len, 1),
        _ints("--cp", a.cp, 1),
        _ints("--docs", a.docs or DEFAULT_DOCS, 0),
        explicit_docs=a.docs is not None,
    )
    for n in notes:
        print(f"layout_bench: {n}", file=sys.stderr)
    if a.dry_run:
        print(
            f"layout_bench: {len(cases)} case(s) on {device.type}: "
            + ", ".join(f"L {L} cp {cp} docs {d}" for L, cp, d in cases)
        )
        return 0
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _usage(
            "it measures GPU kernels and no CUDA device is visible (on a CPU: --device cpu with small sizes, "
            "e.g. --seq-len 4096 --shape 8,4,2,4)"
        )
    timer = _timer(device)
    out = None
    if a.out:
        try:
            out = open(a.out, "w", newline="")  # noqa: SIM115  (closed below)
        except OSError as e:
            raise _usage(f"--out {a.out}: {e.strerror}") from None
        out.write(",".join(COLUMNS) + "\n")
        out.flush()
    nemo = load_nemo(a.nemo) if a.nemo else None
    bw = copy_bandwidth(device, 1 << 30 if device.type == "cuda" else 1 << 26, timer)
    print(
        f"# device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; "
        f"copy bandwidth (read+write) {bw / 1e12:.2f} TB/s",
        flush=True,
    )
    print(",".join(COLUMNS), flush=True)
    runs_max, plan_mod.RUNS_MAX = plan_mod.RUNS_MAX, 0  # the row gather: see the module docstring
    plan_mod.clear_cache()
    try:
        for L, cp, d in cases:
            for r in bench_case(cp, L, d or None, shape, dtype, device, timer, a.warmup, a.iters, nemo, bw):
                line = _csv_line(r[c] for c in COLUMNS)
                print(line, flush=True)
                if out is not None:
                    out.write(line + "\n")
                    out.flush()
    finally:
        plan_mod.RUNS_MAX = runs_max
        plan_mod.clear_cache()
        if out is not None:
            out.close()
    if a.out and a.plot:
        plot(a.out, a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
