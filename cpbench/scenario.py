"""Scenario files: one TOML schema describing a layer, the axes of a sweep and how to run it.

Schema (every table optional except ``[layer]``; unknown tables or keys are errors)::

    name = "smoke"                # optional, default: the file's stem; names the results folder
    description = "..."           # optional, free text

    [layer]                       # the Mamba2 mixer (cp_core.mixer.Mamba2Config)
    d_model = 64                  # required, int > 0
    n_heads = 4                   # required, int > 0 (overridden per case by sweep.heads)
    head_dim = 16                 # required, int > 0      d_inner = n_heads * head_dim
    n_groups = 2                  # required, int > 0, divides n_heads (overridden by sweep.heads)
    d_state = 16                  # required, int > 0
    d_conv = 4                    # default 4
    chunk_size = 256              # default 256, SSD chunk length
    dtype = "float32"             # "float32" | "bfloat16" | "float16", default "float32"

    [sweep]                       # axes; the cross product runs. A scalar counts as a one-element list
    cp_size = [1, 2]              # default [1]; CP group sizes (subgroups of the world)
    seq_len = [256]               # default [4096]; global tokens per sequence (BSHD) or per pack (THD)
    batch = [1]                   # default [1]; sequences (BSHD) or packs (THD, concatenated) per step
    heads = [[4, 2]]              # default [[layer.n_heads, layer.n_groups]]; [n_heads, n_groups] pairs
    packing = ["none", {docs = 8, density = 0.9}]   # default ["none"]; "none" = BSHD [B, L, D],
                                  # a table = packed THD [T, D]: `docs` documents (int >= 1) holding
                                  # round(density * seq_len) real tokens (0 < density <= 1), see cpbench.packing
    layout = ["head_tail"]        # default ["head_tail"]; "head_tail" | "contiguous" | "torch_head_tail"
    path = ["fused"]              # default ["fused"]; "fused" | "seed" (the in-project baseline)
    pass = ["fwd+bwd"]            # default ["fwd+bwd"]; "fwd" (under no_grad) | "fwd+bwd"
    strategy = ["hidden"]         # default ["hidden"]; "hidden" | "state_passing" | "state_passing_chain"
                                  # | "hierarchical" (projection: its grid from run.topology, see cpbench.topology)
    impl = ["cp_core"]            # default ["cp_core"]; also "nemo" (NeMo AutoModel's layer) and "mamba_ssm"
                                  # (mamba-ssm's Mamba2, cp 1 only): peers with the same weights (cpbench.peers)
    overlap_chunks = [1]          # default [1]; head chunks of the hidden strategy pipelined against the
                                  # all-to-alls (must divide the heads a rank holds and divide, or be a
                                  # multiple of, its groups of B/C)

    [run]
    warmup = 2                    # default 2; untimed iterations per case (Triton autotunes each new shape)
    iters = 10                    # default 10; measured iterations per case
    seed = 0                      # default 0; parameters, inputs and packs are seeded from it
    device = "auto"               # "auto" (cuda if available) | "cpu" | "cuda"
    timeout_s = 300               # default 300; process-group timeout: a dead rank ends the run
    backend = "auto"              # "auto" (nccl on cuda, gloo on cpu) | "gloo" | "nccl" | "fake"
    fake_busbw_gbps = 370.0       # busbw assumed by the fake backend's communication model (inside a node)
    topology = ""                 # default "" (one node); "NxG": N nodes of G GPUs (fake backend), cpbench.topology
    net_busbw_gbps = 50.0         # default 50; per GPU across nodes, under a topology
    microbench = true             # default true; all-to-all microbenchmark at each case's message sizes
    microbench_iters = 20         # default 20; measured all-to-alls per message size (after 5 warmups)
    exposed_comm = true           # default true; also time the layer with its collectives suppressed
                                  # (cp > 1, ours): exposed_comm_ms = layer_ms - layer_nocomm_ms
    load_ref = true               # default true; time a fixed torch workload beside every measured
                                  # iteration (ref_ms: the machine's load, cpbench.runner.LoadReference);
                                  # cpbench compare judges layer_ms / ref_ms where both sides have it
    autotune = "cached"           # "cached" (default: Triton autotunes each new shape once and caches the
                                  # result on disk, TRITON_CACHE_AUTOTUNING=1) | "deterministic" (instead
                                  # MAMBA_DETERMINISTIC=1: one config per kernel, short first calls) | "full"

Overrides: ``--set sweep.cp_size=[1,2]`` or ``--set run.iters=3``; the value is parsed as a TOML
value (a bare word that is not valid TOML is taken as a string: ``--set run.device=cpu``).

Invalid combinations are not errors: :meth:`Case.skip_reason` names why a case cannot run
(``cp_size`` larger than the world, ``seq_len`` not a multiple of ``2*cp_size``, ``n_heads`` not
divisible by ``cp_size`` for the hidden strategy, ...), and the sweep records it as ``skipped``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ScenarioError

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

DTYPES = ("float32", "bfloat16", "float16")
LAYOUTS = ("head_tail", "contiguous", "torch_head_tail")  # cp_core.layout.LAYOUTS
PATHS = ("fused", "seed")
PASSES = ("fwd", "fwd+bwd")
STRATEGIES = ("hidden", "state_passing", "state_passing_chain", "hierarchical")
IMPLS = ("cp_core", "nemo", "mamba_ssm")
AUTOTUNE = ("cached", "deterministic", "full")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "gloo", "nccl", "fake")

EMBEDDED_DIR = Path(__file__).resolve().parent / "scenarios"
DEFAULT_SCENARIO = "smoke"

_REQUIRED = object()


# ----------------------------------------------------------------------------------------------- values


class _Bad(Exception):
    """A value that does not fit its key (the message says what was expected)."""


def _int(lo: int | None = None) -> Callable[[Any], int]:
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int):
            raise _Bad(f"expected an integer, got {v!r}")
        if lo is not None and v < lo:
            raise _Bad(f"expected an integer >= {lo}, got {v}")
        return v

    return check


def _float(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Callable[[Any], float]:
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise _Bad(f"expected a number, got {v!r}")
        v = float(v)
        if not math.isfinite(v):
            raise _Bad(f"expected a finite number, got {v}")
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise _Bad(f"expected a number {'>' if lo_open else '>='} {lo}, got {v}")
        if hi is not None and v > hi:
            raise _Bad(f"expected a number <= {hi}, got {v}")
        return v

    return check


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def check(v):
        if not isinstance(v, str) or v not in options:
            raise _Bad(f"expected one of {', '.join(repr(o) for o in options)}, got {v!r}")
        return v

    return check


def _bool(v):
    if not isinstance(v, bool):
        raise _Bad(f"expected true or false, got {v!r}")
    return v


def _str(v):
    if not isinstance(v, str):
        raise _Bad(f"expected a string, got {v!r}")
    return v


def _axis(item: Callable[[Any], Any]) -> Callable[[Any], tuple]:
    """A sweep axis: a non-empty list of items (a scalar counts as a one-element list), duplicates dropped."""

    def check(v):
        values = v if isinstance(v, list) else [v]
        if not values:
            raise _Bad("expected a non-empty list")
        out = []
        for i, x in enumerate(values):
            try:
                x = item(x)
            except _Bad as e:
                raise _Bad(f"item {i}: {e}") from None
            if x not in out:
                out.append(x)
        return tuple(out)

    return check


def _topology(v):
    if v == "":
        return v
    from .topology import parse

    try:
        parse(v)
    except ScenarioError as e:
        raise _Bad(str(e)) from None
    return v.replace(" ", "")


def _heads_pair(v):
    if (
        not isinstance(v, list)
        or len(v) != 2
        or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in v)
    ):
        raise _Bad(f"expected a pair [n_heads, n_groups] of positive integers, got {v!r}")
    n_heads, n_groups = v
    if n_heads % n_groups:
        raise _Bad(f"n_heads {n_heads} is not a multiple of n_groups {n_groups}")
    return (n_heads, n_groups)


@dataclass(frozen=True, order=True)
class Packing:
    """One value of the ``packing`` axis: BSHD (``docs == 0``) or a packed THD batch."""

    docs: int = 0
    density: float = 1.0

    @property
    def packed(self) -> bool:
        return self.docs > 0

    @property
    def label(self) -> str:
        return f"docs={self.docs},density={self.density:g}" if self.packed else "none"

    def to_toml(self) -> Any:
        return {"docs": self.docs, "density": self.density} if self.packed else "none"


def _packing(v):
    if v == "none":
        return Packing()
    if isinstance(v, str):
        raise _Bad(f'expected "none" or a table {{docs = N, density = x}}, got {v!r}')
    if not isinstance(v, dict):
        raise _Bad(f'expected "none" or a table {{docs = N, density = x}}, got {v!r}')
    unknown = sorted(set(v) - {"docs", "density"})
    if unknown:
        raise _Bad(f"unknown key {unknown[0]!r} in a packing table (known: docs, density)")
    if "docs" not in v:
        raise _Bad("a packing table needs docs = N")
    try:
        docs = _int(1)(v["docs"])
    except _Bad as e:
        raise _Bad(f"docs: {e}") from None
    try:
        density = _float(0.0, 1.0, lo_open=True)(v.get("density", 1.0))
    except _Bad as e:
        raise _Bad(f"density: {e}") from None
    return Packing(docs, density)


# ----------------------------------------------------------------------------------------------- schema

#: table -> key -> (check, default). ``_REQUIRED``: the key must be given.
SCHEMA: dict[str, dict[str, tuple[Callable[[Any], Any], Any]]] = {
    "": {"name": (_str, None), "description": (_str, "")},
    "layer": {
        "d_model": (_int(1), _REQUIRED),
        "n_heads": (_int(1), _REQUIRED),
        "head_dim": (_int(1), _REQUIRED),
        "n_groups": (_int(1), _REQUIRED),
        "d_state": (_int(1), _REQUIRED),
        "d_conv": (_int(1), 4),
        "chunk_size": (_int(1), 256),
        "dtype": (_choice(DTYPES), "float32"),
    },
    "sweep": {
        "cp_size": (_axis(_int(1)), (1,)),
        "seq_len": (_axis(_int(1)), (4096,)),
        "batch": (_axis(_int(1)), (1,)),
        "heads": (_axis(_heads_pair), None),
        "packing": (_axis(_packing), (Packing(),)),
        "layout": (_axis(_choice(LAYOUTS)), ("head_tail",)),
        "path": (_axis(_choice(PATHS)), ("fused",)),
        "pass": (_axis(_choice(PASSES)), ("fwd+bwd",)),
        "strategy": (_axis(_choice(STRATEGIES)), ("hidden",)),
        "impl": (_axis(_choice(IMPLS)), ("cp_core",)),
        "overlap_chunks": (_axis(_int(1)), (1,)),
    },
    "run": {
        "warmup": (_int(0), 2),
        "iters": (_int(1), 10),
        "seed": (_int(0), 0),
        "device": (_choice(DEVICES), "auto"),
        "timeout_s": (_float(0.0, lo_open=True), 300.0),
        "backend": (_choice(BACKENDS), "auto"),
        "fake_busbw_gbps": (_float(0.0, lo_open=True), 370.0),
        "topology": (_topology, ""),
        "net_busbw_gbps": (_float(0.0, lo_open=True), 50.0),
        "microbench": (_bool, True),
        "microbench_iters": (_int(1), 20),
        "exposed_comm": (_bool, True),
        "load_ref": (_bool, True),
        "autotune": (_choice(AUTOTUNE), "cached"),
    },
}


@dataclass(frozen=True)
class Layer:
    d_model: int
    n_heads: int
    head_dim: int
    n_groups: int
    d_state: int
    d_conv: int = 4
    chunk_size: int = 256
    dtype: str = "float32"


@dataclass(frozen=True)
class Sweep:
    cp_size: tuple[int, ...]
    seq_len: tuple[int, ...]
    batch: tuple[int, ...]
    heads: tuple[tuple[int, int], ...]
    packing: tuple[Packing, ...]
    layout: tuple[str, ...]
    path: tuple[str, ...]
    pass_: tuple[str, ...]
    strategy: tuple[str, ...]
    impl: tuple[str, ...] = ("cp_core",)
    overlap_chunks: tuple[int, ...] = (1,)


@dataclass(frozen=True)
class Run:
    warmup: int = 2
    iters: int = 10
    seed: int = 0
    device: str = "auto"
    timeout_s: float = 300.0
    backend: str = "auto"
    fake_busbw_gbps: float = 370.0
    topology: str = ""
    net_busbw_gbps: float = 50.0
    microbench: bool = True
    microbench_iters: int = 20
    exposed_comm: bool = True
    load_ref: bool = True
    autotune: str = "cached"


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    layer: Layer
    sweep: Sweep
    run: Run
    source: str = "<scenario>"
    text: str = ""  # the file as read (before overrides)
    overrides: tuple[str, ...] = field(default=())

    @property
    def pack_granule(self) -> int:
        """Every document of every pack is padded to a multiple of this: ``2 * max(cp_size)``.

        One granule for the whole sweep makes the packs identical for every cp_size and layout
        (same documents, same padding), so scaling numbers compare the same work.
        """
        return 2 * max(self.sweep.cp_size)

    def cases(self) -> list[Case]:
        """The cross product of the axes, in run order (cp_size innermost but for path and pass)."""
        s = self.sweep
        out = []
        for heads, strategy, layout, packing, batch, seq_len, cp, path, pass_, chunks, impl in itertools.product(
            s.heads, s.strategy, s.layout, s.packing, s.batch, s.seq_len, s.cp_size, s.path, s.pass_,
            s.overlap_chunks, s.impl,
        ):  # fmt: skip
            out.append(
                Case(
                    index=len(out),
                    scenario=self.name,
                    cp_size=cp,
                    seq_len=seq_len,
                    batch=batch,
                    n_heads=heads[0],
                    n_groups=heads[1],
                    packing=packing,
                    layout=layout,
                    path=path,
                    pass_=pass_,
                    strategy=strategy,
                    dtype=self.layer.dtype,
                    pack_granule=self.pack_granule,
                    impl=impl,
                    overlap_chunks=chunks,
                )
            )
        return out

    def to_toml(self) -> str:
        """The resolved scenario (overrides applied, defaults filled in) as TOML text."""
        lay, sw, run = self.layer, self.sweep, self.run
        tables = {
            "": {"name": self.name, "description": self.description},
            "layer": {k: getattr(lay, k) for k in SCHEMA["layer"]},
            "sweep": {
                "cp_size": list(sw.cp_size),
                "seq_len": list(sw.seq_len),
                "batch": list(sw.batch),
                "heads": [list(h) for h in sw.heads],
                "packing": [p.to_toml() for p in sw.packing],
                "layout": list(sw.layout),
                "path": list(sw.path),
                "pass": list(sw.pass_),
                "strategy": list(sw.strategy),
                "impl": list(sw.impl),
                "overlap_chunks": list(sw.overlap_chunks),
            },
            "run": {k: getattr(run, k) for k in SCHEMA["run"]},
        }
        lines = []
        for table, values in tables.items():
            if table:
                lines.append(f"\n[{table}]")
            for k, v in values.items():
                lines.append(f"{k} = {_toml_value(v)}")
        return "\n".join(lines).lstrip("\n") + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


# ----------------------------------------------------------------------------------------------- cases

#: The columns that identify a case (the join key of ``cpbench compare``).
CASE_KEY = (
    "scenario",
    "cp_size",
    "seq_len",
    "batch",
    "n_heads",
    "n_groups",
    "packing",
    "docs",
    "density",
    "layout",
    "path",
    "pass",
    "strategy",
    "impl",
    "overlap_chunks",
    "dtype",
    "device",
    "world_size",
    "backend",
)

#: Values of key columns added after results were first written: older CSVs read as these.
KEY_DEFAULTS = {"impl": "cp_core", "overlap_chunks": 1}


@dataclass(frozen=True)
class Case:
    index: int
    scenario: str
    cp_size: int
    seq_len: int
    batch: int
    n_heads: int
    n_groups: int
    packing: Packing
    layout: str
    path: str
    pass_: str
    strategy: str
    dtype: str
    pack_granule: int
    impl: str = "cp_core"
    overlap_chunks: int = 1

    @property
    def backward(self) -> bool:
        return self.pass_ == "fwd+bwd"

    @property
    def tokens(self) -> int:
        """Global tokens per step (padding included)."""
        return self.batch * self.seq_len

    @property
    def local_tokens(self) -> int:
        """Tokens per rank per sequence (BSHD) or of the whole concatenated pack (THD)."""
        return (self.tokens if self.packing.packed else self.seq_len) // self.cp_size

    @property
    def comm_batch(self) -> int:
        """The batch the layer sees: B for BSHD, 1 for THD (the packs are concatenated)."""
        return 1 if self.packing.packed else self.batch

    def key(self, *, device: str, world_size: int, backend: str) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "cp_size": self.cp_size,
            "seq_len": self.seq_len,
            "batch": self.batch,
            "n_heads": self.n_heads,
            "n_groups": self.n_groups,
            "packing": self.packing.label,
            "docs": self.packing.docs,
            "density": self.packing.density,
            "layout": self.layout,
            "path": self.path,
            "pass": self.pass_,
            "strategy": self.strategy,
            "impl": self.impl,
            "overlap_chunks": self.overlap_chunks,
            "dtype": self.dtype,
            "device": device,
            "world_size": world_size,
            "backend": backend,
        }

    def describe(self) -> str:
        return (
            f"cp={self.cp_size} L={self.seq_len} B={self.batch} heads={self.n_heads}/{self.n_groups} "
            f"{self.packing.label} {self.layout} {self.path} {self.pass_} {self.strategy}"
            + (f" k={self.overlap_chunks}" if self.overlap_chunks != 1 else "")
            + (f" [{self.impl}]" if self.impl != "cp_core" else "")
        )

    def skip_reason(self, world_size: int | None) -> str | None:
        """Why this case cannot run on a world of ``world_size`` ranks (``None``: the fake backend)."""
        cp = self.cp_size
        if world_size is not None:
            if cp > world_size:
                return f"cp_size {cp} > world size {world_size}"
            if world_size % cp:
                return f"world size {world_size} is not a multiple of cp_size {cp}"
        granule = cp if self.layout == "contiguous" else 2 * cp
        if self.packing.packed:
            if self.seq_len % self.pack_granule:
                return (
                    f"seq_len {self.seq_len} is not a multiple of the pack granule {self.pack_granule} "
                    f"(2 * the largest cp_size of the sweep)"
                )
        elif self.seq_len % granule:
            what = "cp_size" if self.layout == "contiguous" else "2*cp_size"
            return f"seq_len {self.seq_len} is not a multiple of {what} = {granule} (layout {self.layout})"
        if self.strategy == "hidden" and cp > 1 and self.n_heads % cp:
            return f"n_heads {self.n_heads} is not divisible by cp_size {cp} (strategy hidden)"
        if self.layout == "torch_head_tail" and (self.strategy != "hidden" or self.path != "fused"):
            return "layout torch_head_tail (torch's context_parallel order) runs with strategy hidden, path fused"
        if self.overlap_chunks > 1 and (cp == 1 or self.strategy != "hidden"):
            return f"overlap_chunks {self.overlap_chunks} applies to the hidden strategy at cp > 1 only"
        from .peers import skip_reason

        return skip_reason(self.impl, cp, self.strategy, self.path, self.layout, self.overlap_chunks)


# ----------------------------------------------------------------------------------------------- loading


def parse_override(spec: str) -> tuple[str, str, Any]:
    """``"sweep.cp_size=[1,2]"`` -> ``("sweep", "cp_size", [1, 2])``; the value is TOML (or a bare string)."""
    if "=" not in spec:
        raise ScenarioError(f"--set {spec!r}: expected TABLE.KEY=VALUE, e.g. --set run.iters=3")
    path, raw = spec.split("=", 1)
    path = path.strip()
    table, _, key = path.rpartition(".")
    if table == "" and key not in SCHEMA[""]:
        raise ScenarioError(f"--set {spec!r}: expected TABLE.KEY=VALUE (tables: layer, sweep, run)")
    if table not in SCHEMA:
        raise ScenarioError(f"--set {spec!r}: unknown table {table!r} (known: layer, sweep, run)")
    if key not in SCHEMA[table]:
        raise ScenarioError(
            f"--set {spec!r}: unknown key {_dotted(table, key)!r} (known in [{table}]: "
            f"{', '.join(SCHEMA[table])})"
        )
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return table, key, value


def _dotted(table: str, key: str) -> str:
    return f"{table}.{key}" if table else key


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """A copy of the raw TOML ``data`` with each ``TABLE.KEY=VALUE`` applied."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for spec in overrides:
        table, key, value = parse_override(spec)
        if table:
            section = data.setdefault(table, {})
            if not isinstance(section, dict):
                raise ScenarioError(f"--set {spec!r}: [{table}] is not a table in the scenario")
            section[key] = value
        else:
            data[key] = value
    return data


def parse_scenario(
    data: dict, *, source: str = "<scenario>", text: str = "", name: str | None = None, overrides=()
) -> Scenario:
    """Validate raw TOML data (a dict) into a :class:`Scenario`; errors name ``source`` and the key."""
    overrides = tuple(overrides)
    data = apply_overrides(data, overrides)
    where = source + (f" (with --set {' '.join(overrides)})" if overrides else "")

    def fail(table: str, key: str | None, problem: str):
        loc = f"[{table}] {key}" if table and key else (f"[{table}]" if table else key)
        raise ScenarioError(f"{where}: {loc}: {problem}")

    for table, value in data.items():
        if table in SCHEMA and table != "" and isinstance(value, dict):
            continue
        if table in SCHEMA[""]:
            continue
        if table in SCHEMA and table != "":
            fail("", table, f"expected a table [{table}], got {value!r}")
        known = ", ".join([f"[{t}]" for t in SCHEMA if t] + list(SCHEMA[""]))
        fail("", table, f"unknown key {table!r} (known: {known})")

    resolved: dict[str, dict[str, Any]] = {}
    for table, fields in SCHEMA.items():
        raw = {k: v for k, v in data.items() if k in fields} if table == "" else data.get(table, {})
        for key in raw:
            if key not in fields:
                fail(table, key, f"unknown key {key!r} (known in [{table}]: {', '.join(fields)})")
        values = {}
        for key, (check, default) in fields.items():
            if key in raw:
                try:
                    values[key] = check(raw[key])
                except _Bad as e:
                    fail(table, key, str(e))
            elif default is _REQUIRED:
                fail(table, key, "missing (required)")
            else:
                values[key] = default
        resolved[table] = values

    lay = resolved["layer"]
    if lay["n_heads"] % lay["n_groups"]:
        fail("layer", "n_groups", f"n_heads {lay['n_heads']} is not a multiple of n_groups {lay['n_groups']}")
    sw = dict(resolved["sweep"])
    if sw["heads"] is None:
        sw["heads"] = ((lay["n_heads"], lay["n_groups"]),)
    sw["pass_"] = sw.pop("pass")
    top = resolved[""]
    scen_name = top["name"] or name or Path(source).stem or "scenario"
    if not scen_name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        fail("", "name", f"expected letters, digits, '-', '_' or '.', got {scen_name!r}")
    return Scenario(
        name=scen_name,
        description=top["description"],
        layer=Layer(**lay),
        sweep=Sweep(**sw),
        run=Run(**resolved["run"]),
        source=source,
        text=text,
        overrides=overrides,
    )


def resolve_path(spec: str | None) -> Path:
    """A scenario argument: a file path, or the name of an embedded scenario (``smoke``, ``h100_node``)."""
    if spec is None:
        return EMBEDDED_DIR / f"{DEFAULT_SCENARIO}.toml"
    p = Path(spec)
    if p.is_file():
        return p
    for cand in (EMBEDDED_DIR / spec, EMBEDDED_DIR / f"{spec}.toml"):
        if cand.is_file() and "/" not in spec:
            return cand
    known = ", ".join(sorted(q.stem for q in EMBEDDED_DIR.glob("*.toml")))
    raise ScenarioError(f"{spec}: no such scenario file (embedded scenarios: {known})")


def load_scenario(spec: str | None = None, overrides: Iterable[str] = ()) -> Scenario:
    """Read, override and validate a scenario (file path, embedded name, or ``None`` for the default)."""
    path = resolve_path(spec)
    try:
        text = path.read_text()
    except OSError as e:
        raise ScenarioError(f"{path}: cannot read: {e.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(f"{path}: not valid TOML: {e}") from None
    return parse_scenario(data, source=str(path), text=text, name=path.stem, overrides=overrides)


def embedded_scenarios() -> list[Path]:
    return sorted(EMBEDDED_DIR.glob("*.toml"))
