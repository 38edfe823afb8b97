"""CPOptions: validated once (ValueError naming the field), the environment read in one function only, and
the layer built from it."""

import pathlib
import re

import pytest
from test_mixer_parity import small_cfg

from cp_core.comm import LocalGroup
from cp_core.mamba_cp import MambaContextParallel
from cp_core.mixer import Mamba2Config, Mamba2Mixer
from cp_core.options import CPOptions, default_options


@pytest.mark.parametrize(
    "field, value",
    [
        ("ssd_backend", "triton"),
        ("conv_backend", "cudnn"),
        ("overlap_chunks", 0),
        ("overlap_chunks", True),
        ("overlap_chunks", 2.0),
        ("state_exchange", "ring"),
        ("agree", "never"),
    ],
)
def test_bad_field_raises_naming_it(field, value):
    with pytest.raises(ValueError, match=rf"CPOptions\.{field} must be .*got {re.escape(repr(value))}"):
        CPOptions(**{field: value})


def test_defaults_and_replace():
    o = CPOptions()
    assert (o.ssd_backend, o.conv_backend, o.overlap_chunks, o.state_exchange, o.agree) == (
        "auto",
        "auto",
        None,
        "allgather",
        "auto",
    )
    assert o.replace(overlap_chunks=2).overlap_chunks == 2
    with pytest.raises(ValueError, match=r"CPOptions.overlap_chunks"):
        o.replace(overlap_chunks=-1)
    with pytest.raises(ValueError, match=r"no field\(s\) \['chunks'\]"):
        o.replace(chunks=2)


def test_default_options_read_the_environment(monkeypatch):
    monkeypatch.delenv("CP_CORE_SSD_BACKEND", raising=False)
    monkeypatch.delenv("CP_CORE_CONV_BACKEND", raising=False)
    assert default_options() == CPOptions()
    monkeypatch.setenv("CP_CORE_SSD_BACKEND", "torch")
    monkeypatch.setenv("CP_CORE_CONV_BACKEND", " ")  # blank: unset
    assert default_options() == CPOptions(ssd_backend="torch")
    assert default_options(agree="batch") == CPOptions(ssd_backend="torch", agree="batch")
    m = Mamba2Mixer(Mamba2Config(**small_cfg(4, 2)))
    assert m.options.ssd_backend == "torch" and m.ssd_backend == "torch"
    monkeypatch.setenv("CP_CORE_CONV_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"CPOptions.conv_backend .* CP_CORE_CONV_BACKEND='bogus'"):
        default_options()


def test_nothing_else_reads_the_environment():
    """``default_options`` is the one reader of cp_core's environment variables (a test that can fail: the
    grep finds any other ``os.environ`` / ``getenv`` read). Allowed elsewhere: Triton's own
    ``TRITON_INTERPRET`` (whether the interpreter runs the kernels on CPU tensors)."""
    root = pathlib.Path(__file__).resolve().parents[1] / "cp_core"
    reads = {}
    for p in root.rglob("*.py"):
        for line in p.read_text().splitlines():
            if re.search(r"os\.environ|getenv\(", line):
                reads.setdefault(str(p.relative_to(root)), []).append(line.strip())
    others = {f: lines for f, lines in reads.items() if f != "options.py"}
    assert all("TRITON_INTERPRET" in line for lines in others.values() for line in lines), others
    assert "options.py" in reads


def test_mixer_takes_options_and_keyword_overrides():
    cfg = Mamba2Config(**small_cfg(8, 4))
    o = CPOptions(overlap_chunks=2, ssd_backend="torch")
    m = Mamba2Mixer(cfg, cp_group=LocalGroup(0, 2), options=o)
    assert m.options is not None and m.overlap_chunks == 2 and m.ssd_backend == "torch"
    m = Mamba2Mixer(cfg, cp_group=LocalGroup(0, 2), options=o, overlap_chunks=1, conv_backend="torch")
    assert (m.overlap_chunks, m.conv_backend, m.ssd_backend) == (1, "torch", "torch")
    m = Mamba2Mixer(cfg, strategy="state_passing_chain")
    assert (m.strategy, m.state_exchange, m.options.state_exchange) == ("state_passing", "chain", "chain")
    with pytest.raises(ValueError, match="options must be a cp_core.options.CPOptions, got dict"):
        Mamba2Mixer(cfg, options={"agree": "call"})
    with pytest.raises(ValueError, match="CPOptions.ssd_backend"):
        Mamba2Mixer(cfg, ssd_backend="nope")
    with pytest.raises(ValueError, match="overlap_chunks 3 must divide"):  # checked against the group
        Mamba2Mixer(cfg, cp_group=LocalGroup(0, 2), options=CPOptions(overlap_chunks=3))
    ctx = MambaContextParallel(LocalGroup(0, 2), 8, 4, 4, 4, None, options=CPOptions(agree="batch"))
    assert ctx.options.agree == "batch"
    with pytest.raises(ValueError, match="options must be"):
        MambaContextParallel(LocalGroup(0, 2), 8, 4, 4, 4, None, options="call")
