"""``cpbench plot RESULTS.csv``: PNG figures of a sweep (matplotlib, Agg backend).

* ``regions-<group>.png``: time per region vs seq_len, one panel per cp_size. The left bar of each
  length stacks the layer's stages, which run one after the other (``layout``, ``conv1d``, ``ssm``,
  ``norm_proj``, their ``_bwd``, and the collectives ``a2a_*`` / ``state_xchg`` where they block:
  ``overlap_chunks`` 1; with head chunks the collectives run beside compute, so ``exposed_comm``
  is stacked instead), each at its own median, never rescaled, with ``other`` the rest of the
  layer's median (a black tick; the medians of the parts need not add up to the median of the
  whole). Quantities that overlap the stages (``comm``, ``comm_xfer``, ``comm_wait``,
  ``layer_nocomm``, and ``exposed_comm`` where not stacked) are the hatched bars beside it, each
  from zero (:func:`stack_heights`, :data:`APART`; the per-collective ``*_xfer`` times are in the
  CSV). Every stage has its own colour (a ``_bwd`` stage the light shade of its forward's). One
  figure per combination of the other axes (path, pass, packing...);
* ``busbw.png``: the layer's all-to-all busbw vs message size, against the microbenchmark at the
  same sizes on the same groups (measured rows only);
* ``scaling-<group>.png``: layer time vs cp_size, one line per seq_len, with the ideal ``1/cp``
  line from each line's smallest cp_size;
* ``strategy-bytes.png`` (when the ``strategy`` axis holds both ``hidden`` and ``state_passing``):
  bytes per rank per layer forward vs seq_len for both strategies, one colour per cp_size, with
  the crossover (where the cheaper strategy changes) marked;
* ``strategy-time.png`` (when a case ran under two strategies or more): the layer time vs seq_len per
  strategy, one panel per cp_size, the crossover lengths of :func:`cpbench.report.strategy_times` marked.

At most :data:`MAX_GROUPS` figures of each per-group kind are drawn.
"""

from __future__ import annotations

import math
import re
import zlib
from pathlib import Path

from .scenario import CASE_KEY

MAX_GROUPS = 24
#: The layer's stages (cp_core.regions), in stacking order; a ``_bwd`` stage follows its forward.
STAGES = ("layout", "a2a_pre", "state_xchg", "conv1d", "ssm", "a2a_post", "norm_proj")
#: Stages that are collectives: stacked only where they block (``overlap_chunks`` 1).
COMM_STAGES = ("a2a_pre", "a2a_post", "state_xchg")
#: Quantities that overlap the stages: drawn apart, each from zero.
APART = ("comm", "comm_xfer", "comm_wait", "layer_nocomm", "exposed_comm")
#: tab20 index pairs (dark, light) per stage: the forward dark, the backward light.
_STAGE_COLOUR = {
    "ssm": 0,
    "conv1d": 2,
    "a2a_pre": 4,
    "a2a_post": 6,
    "layout": 8,
    "norm_proj": 10,
    "state_xchg": 12,
    "exposed_comm": 14,
}
_APART_COLOUR = {
    "comm": "#1b9e77",
    "comm_xfer": "#d95f02",
    "comm_wait": "#7570b3",
    "layer_nocomm": "#e7298a",
    "exposed_comm": "#66a61e",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int = 100, rect=None) -> Path:
    """Lay out, write and close one figure."""
    fig.tight_layout(**({} if rect is None else {"rect": rect}))
    fig.savefig(path, dpi=dpi)
    _plt().close(fig)
    return path


def _slug(parts: dict) -> str:
    s = "-".join(f"{k}_{v}" for k, v in parts.items()) or "all"
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", s)[:150]


def _stage(name: str) -> str | None:
    base = name[: -len("_bwd")] if name.endswith("_bwd") else name
    return base if base in STAGES else None


def region_columns(df) -> list[str]:
    """The layer's stages with a time column holding at least one number, in stacking order (forward
    stages, then backward ones); derived quantities (``comm_xfer``, ``exposed_comm``...) excluded."""
    have = [
        c[:-3] for c in df.columns if c.endswith("_ms") and _stage(c[:-3]) is not None and df[c].notna().any()
    ]
    order = {n: i for i, n in enumerate([*STAGES, *(f"{s}_bwd" for s in STAGES)])}
    return sorted(have, key=lambda n: order[n])


def stage_colour(name: str):
    """One colour per stage: tab20's dark shade for the forward, its light one for ``_bwd``."""
    import matplotlib

    tab = matplotlib.colormaps["tab20"].colors
    base = name[: -len("_bwd")] if name.endswith("_bwd") else name
    i = _STAGE_COLOUR.get(base)
    if i is None:
        return matplotlib.colormaps["tab20b"].colors[zlib.crc32(base.encode()) % 20]  # the same in every run
    return tab[i + (1 if name.endswith("_bwd") else 0)]


def _group_cols(df, exclude: set[str]) -> list[str]:
    keys = [c for c in CASE_KEY if c in df.columns and c not in ("docs", "density") and c not in exclude]
    return [c for c in keys if df[c].nunique(dropna=False) > 1]


def _groups(df, cols):
    if not cols:
        yield {}, df
        return
    for i, (k, g) in enumerate(df.groupby(cols, sort=True, dropna=False)):
        if i >= MAX_GROUPS:
            break
        k = k if isinstance(k, tuple) else (k,)
        yield dict(zip(cols, k, strict=True)), g


def _values(sub, col: str) -> list[float]:
    if col not in sub.columns:
        return [0.0] * len(sub)
    return [0.0 if v != v else float(v) for v in sub[col]]


def stack_heights(sub, regions: list[str], overlapped: bool = False):
    """``(segments, other, apart)`` for each row: the stacked segments per stage (their medians as
    measured, never rescaled), ``other`` (the layer's median not covered by them, 0 where their
    medians add up to more) and the overlapping quantities drawn beside the stack.

    ``overlapped``: the collectives run beside compute (``overlap_chunks`` > 1), so the collective
    stages leave the stack and ``exposed_comm`` (what they added to the layer) enters it."""
    layer = _values(sub, "layer_ms")
    segments: dict[str, list[float]] = {}
    stacked = [r for r in regions if not (overlapped and _stage(r) in COMM_STAGES)]
    if overlapped and "exposed_comm_ms" in sub.columns:
        stacked.append("exposed_comm")
    for r in stacked:
        vals = [max(0.0, v) for v in _values(sub, f"{r}_ms")]
        if any(vals):
            segments[r] = vals
    totals = [sum(v[i] for v in segments.values()) for i in range(len(layer))]
    other = [max(0.0, t - s) for t, s in zip(layer, totals, strict=True)]
    apart = {}
    for q in APART:
        if q in segments or f"{q}_ms" not in sub.columns:
            continue
        vals = _values(sub, f"{q}_ms")
        if any(vals):
            apart[q] = vals
    return segments, other, apart


def plot_regions(df, out: Path) -> list[Path]:
    plt = _plt()
    regions = region_columns(df)
    files = []
    for gkey, g in _groups(df, _group_cols(df, {"cp_size", "seq_len"})):
        cps = sorted(g["cp_size"].unique())
        k = int(g["overlap_chunks"].max()) if "overlap_chunks" in g.columns else 1
        legend: dict[str, object] = {}
        width_in = 5.5 * len(cps) + 2.6  # the legend's column on the right
        fig, axes = plt.subplots(1, len(cps), figsize=(width_in, 4.8), squeeze=False, sharey=True)
        for ax, cp in zip(axes[0], cps, strict=True):
            sub = g[g["cp_size"] == cp].sort_values("seq_len")
            xs = list(range(len(sub)))
            segments, other, apart = stack_heights(sub, regions, overlapped=k > 1)
            width = 0.42
            left = [x - width / 2 - 0.02 for x in xs]
            bottom = [0.0] * len(sub)
            for r, vals in segments.items():
                colour = stage_colour(r) if r != "exposed_comm" else stage_colour("exposed_comm")
                legend[r] = ax.bar(left, vals, width, bottom=bottom, label=r, color=colour)
                bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
            legend["other"] = ax.bar(left, other, width, bottom=bottom, label="other", color="0.85")
            layer = _values(sub, "layer_ms")
            legend["layer median"] = ax.scatter(left, layer, marker="_", s=500, color="k", zorder=3)
            if apart:
                w = width / len(apart)
                for j, (q, vals) in enumerate(apart.items()):
                    pos = [x + 0.02 + w * (j + 0.5) for x in xs]
                    legend[f"{q} (apart)"] = ax.bar(
                        pos,
                        vals,
                        w,
                        label=q,
                        facecolor="none",
                        edgecolor=_APART_COLOUR[q],
                        hatch="////",
                        lw=1.2,
                    )
            ax.set_xticks(xs, [str(int(s)) for s in sub["seq_len"]], rotation=45)
            ax.set_title(f"cp_size {cp}")
            ax.set_xlabel("seq_len (tokens)")
            ax.grid(axis="y", alpha=0.3)
            ax.margins(y=0.08)
        axes[0][0].set_ylabel("ms per iteration (median over iterations)")
        order = [r for r in [*regions, "exposed_comm", "other", "layer median"] if r in legend]
        order += [q for q in legend if q not in order]  # the hatched ones, in APART order
        fig.legend([legend[q] for q in order], order, loc="center right", fontsize="small")
        what = (
            "stacked: the layer's stages"
            + (" + exposed comm" if k > 1 else "")
            + "; hatched: overlapping, from 0"
        )
        fig.suptitle(
            "regions " + (", ".join(f"{k}={v}" for k, v in gkey.items()) or "") + f"\n{what}",
            fontsize="medium",
        )
        files.append(_save(fig, out / f"regions-{_slug(gkey)}.png", rect=(0, 0, 1 - 2.6 / width_in, 1)))
    return files


def plot_busbw(df, out: Path) -> list[Path]:
    plt = _plt()
    if "comm_model" in df.columns:
        df = df[df["comm_model"].isin(["measured", ""])]
    a2a = sorted(
        {
            c[: -len("_busbw_GBps")]
            for c in df.columns
            if c.endswith("_busbw_GBps") and not c.endswith("_bench_busbw_GBps") and c.startswith("a2a")
        }
    )
    points, bench = [], []
    for _, row in df.iterrows():
        for r in a2a:
            b, bw = row.get(f"{r}_bytes"), row.get(f"{r}_busbw_GBps")
            if _num(b) and _num(bw):
                points.append((row["cp_size"], float(b), float(bw)))
            bb = row.get(f"{r}_bench_busbw_GBps")
            if _num(b) and _num(bb):
                bench.append((row["cp_size"], float(b), float(bb)))
    if not points:
        return []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for cp in sorted({p[0] for p in points}):
        pts = [(b, bw) for c, b, bw in points if c == cp]
        line = ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=f"layer, cp {cp}", s=18)
        bpts = sorted({(b, bw) for c, b, bw in bench if c == cp})
        if bpts:
            ax.plot(
                [p[0] for p in bpts],
                [p[1] for p in bpts],
                "--",
                color=line.get_facecolor()[0],
                label=f"all_to_all_single, cp {cp}",
            )
    ax.set_xscale("log")
    ax.set_xlabel("message size per rank (bytes)")
    ax.set_ylabel("busbw (GB/s)")
    ax.set_title("all-to-all busbw: layer vs microbenchmark")
    ax.legend(fontsize="small")
    return [_save(fig, out / "busbw.png")]


def plot_scaling(df, out: Path) -> list[Path]:
    plt = _plt()
    files = []
    for gkey, g in _groups(df, _group_cols(df, {"cp_size", "seq_len"})):
        if g["cp_size"].nunique() < 2:
            continue
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for L in sorted(g["seq_len"].unique()):
            sub = g[g["seq_len"] == L].sort_values("cp_size")
            sub = sub[sub["layer_ms"].notna()]
            if not len(sub):
                continue
            cps, ts = list(sub["cp_size"]), list(sub["layer_ms"])
            line = ax.plot(cps, ts, "o-", label=f"L={int(L)}")[0]
            ax.plot(cps, [ts[0] * cps[0] / c for c in cps], ":", color=line.get_color())
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("cp_size")
        ax.set_ylabel("layer time (ms)")
        ax.set_title(
            "scaling (dotted: ideal 1/cp) " + ", ".join(f"{k}={v}" for k, v in gkey.items()), fontsize="small"
        )
        ax.legend(fontsize="small")
        files.append(_save(fig, out / f"scaling-{_slug(gkey)}.png"))
    return files


def crossovers(xs: list[float], a: list[float], b: list[float]) -> list[float]:
    """x where ``a - b`` changes sign between consecutive points, interpolated on log-log axes
    (where a power law such as bytes ~ seq_len is a straight line)."""
    out = []
    logs = all(v > 0 for v in (*a, *b))
    for i in range(len(xs) - 1):
        if logs:
            d0 = math.log(a[i]) - math.log(b[i])
            d1 = math.log(a[i + 1]) - math.log(b[i + 1])
        else:
            d0, d1 = a[i] - b[i], a[i + 1] - b[i + 1]
        if d0 == 0:
            out.append(xs[i])
        elif d0 * d1 < 0:
            f = d0 / (d0 - d1)
            lx = math.log(xs[i]) + f * (math.log(xs[i + 1]) - math.log(xs[i]))
            out.append(math.exp(lx))
    return out


def plot_strategy(df_all, out: Path) -> list[Path]:
    if "strategy" not in df_all.columns:
        return []
    strategies = set(df_all["strategy"])
    if "hidden" not in strategies or len(strategies) < 2 or "comm_bytes_fwd" not in df_all.columns:
        return []
    from .report import strategy_crossover

    plt = _plt()
    df = df_all[df_all["comm_bytes_fwd"].notna() & (df_all["cp_size"] > 1)]
    if not len(df):
        return []
    # one packing (state passing's bytes depend on the number of documents): BSHD when present
    packings = list(dict.fromkeys(df["packing"])) if "packing" in df.columns else []
    packing = "none" if "none" in packings else (packings[0] if packings else None)
    if packing is not None:
        df = df[df["packing"] == packing]
    cross = strategy_crossover(df)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = {"hidden": "o-", "state_passing": "s--", "state_passing_chain": "^:"}
    for i, cp in enumerate(sorted(df["cp_size"].unique())):
        for strat in sorted(set(df["strategy"]), key=lambda v: (v != "hidden", v)):
            sub = df[(df["cp_size"] == cp) & (df["strategy"] == strat)]
            sub = sub.groupby("seq_len", sort=True)["comm_bytes_fwd"].first()
            if len(sub):
                ax.plot(
                    list(sub.index),
                    list(sub.values),
                    styles.get(strat, "x-."),
                    color=colors[i % len(colors)],
                    label=f"{strat}, cp {cp}",
                )
        if cross is not None:
            for row in cross[cross["cp_size"] == cp].itertuples(index=False):
                x = float(row[-1])
                ax.axvline(
                    x, color=colors[i % len(colors)], alpha=0.5, lw=1, ls=styles.get(row[1], "-")[1:] or "-"
                )
                ax.annotate(
                    f"cp {cp} {row[1]}: L*≈{x:.0f}",
                    (x, ax.get_ylim()[0]),
                    fontsize="xx-small",
                    va="bottom",
                    rotation=90,
                )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("seq_len (tokens)")
    ax.set_ylabel("bytes per rank per layer forward")
    ax.set_title(f"communication volume: hidden vs state passing (packing {packing})", fontsize="medium")
    ax.legend(fontsize="small")
    return [_save(fig, out / "strategy-bytes.png")]


def plot_strategy_times(df, out: Path) -> list[Path]:
    """Layer ms against seq_len, one line per strategy, one panel per cp_size (the first packing/pass case)."""
    from .report import strategy_times

    got = strategy_times(df)
    if got is None:
        return []
    tab, _ = got
    cols = [c for c in tab.columns if c.endswith(" ms")]
    for c in ("packing", "pass", "batch", "n_heads", "n_groups", "layout", "path", "dtype"):
        if c in tab.columns and tab[c].nunique(dropna=False) > 1:
            tab = tab[tab[c] == tab[c].iloc[0]]
    cps = sorted(tab["cp_size"].unique())
    plt = _plt()
    fig, axes = plt.subplots(1, len(cps), figsize=(4.2 * len(cps), 4.2), squeeze=False)
    styles = {
        "hidden ms": "o-",
        "state_passing ms": "s--",
        "hierarchical ms": "^-",
        "state_passing_chain ms": "v:",
    }
    for ax, cp in zip(axes[0], cps, strict=True):
        sub = tab[tab["cp_size"] == cp].sort_values("seq_len")
        for c in cols:
            if sub[c].notna().any():
                ax.plot(sub["seq_len"], sub[c], styles.get(c, "x-."), label=c.removesuffix(" ms"))
        for a, b in zip(sub.itertuples(index=False), list(sub.itertuples(index=False))[1:], strict=False):
            if a.fastest != b.fastest:
                ax.axvspan(a.seq_len, b.seq_len, color="0.9", zorder=0)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter("{x:g}")  # plain ms, not 1.2 x 10^1
        lo, hi = ax.get_ylim()
        if hi < 10 * lo:  # less than a decade: the minor ticks are the only labels, so label them
            ax.yaxis.set_minor_formatter("{x:g}")
        ax.set_title(f"cp {cp}", fontsize="medium")
        ax.set_xlabel("seq_len (tokens)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("layer ms (slowest rank's median)")
    axes[0][0].legend(fontsize="small")
    fig.suptitle("layer time per strategy (shaded: the fastest changes)", fontsize="medium")
    return [_save(fig, out / "strategy-time.png", dpi=110)]


def _num(v) -> bool:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return False
    return math.isfinite(f) and f > 0


def plot_overlap(df, out: Path) -> list[Path]:
    """Exposed communication (and all of it, as the regions' time) against ``overlap_chunks``, one line
    per case (cp, L, packing), when the results hold chunked runs of the hidden strategy."""
    from .report import overlap_table

    tab = overlap_table(df)
    if tab is None or tab.empty:
        return []
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (cp, seq, pk), sub in tab.groupby(["cp_size", "seq_len", "packing"]):
        sub = sub.sort_values("k")
        label = f"cp {cp}, L {seq // 1024}K, {pk}"
        (line,) = ax.plot(sub["k"], sub["exposed ms"], marker="o", label=f"{label}: exposed")
        ax.plot(sub["k"], sub["comm ms"], marker="x", ls=":", color=line.get_color(), alpha=0.6)
    ax.set_xlabel("overlap_chunks k (head chunks pipelined against the all-to-alls)")
    ax.set_ylabel("ms per layer (fwd+bwd)")
    ax.set_title("exposed communication (solid) and communication time (dotted) vs k")
    ax.set_xticks(sorted(tab["k"].unique()))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return [_save(fig, out / "overlap.png", dpi=110)]


def plot_peers(df, out: Path) -> list[Path]:
    """Our layer's time and peak memory as a ratio to each peer in the results, per case."""
    from .report import peer_ratios

    files = []
    for peer in ("nemo", "mamba_ssm"):
        tab = peer_ratios(df, peer)
        if tab is None or tab.empty:
            continue
        tab = tab[tab["impl"] == "cp_core"]
        if tab.empty:
            continue
        plt = _plt()
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        labels = [
            f"cp{r.cp_size} {r.seq_len // 1024}K {'pk' if r.packing != 'none' else 'bshd'} k{r.k}"
            for r in tab.itertuples()
        ]
        for ax, col, what in ((axes[0], "time ratio", "time"), (axes[1], "memory ratio", "peak memory")):
            ax.bar(range(len(tab)), tab[col])
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xticks(range(len(tab)), labels, rotation=70, fontsize=7)
            ax.set_ylabel(f"ours / {peer}")
            ax.set_title(f"{what}: ours / {peer} (lower is better)")
            ax.set_yscale("log")
        files.append(_save(fig, out / f"peers-vs-{peer}.png", dpi=110))
    return files


def plot_all(df, out_dir: str | Path) -> list[Path]:
    """Every figure that the data supports; returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ok = df[df["status"] == "ok"] if "status" in df.columns else df
    files: list[Path] = []
    if len(ok):
        files += plot_regions(ok, out)
        files += plot_busbw(ok, out)
        files += plot_scaling(ok, out)
    files += plot_strategy(df, out)
    files += plot_strategy_times(df, out)
    files += plot_overlap(df, out)
    files += plot_peers(df, out)
    return files
