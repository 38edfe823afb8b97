"""The pipelined layer's cross-stream safety on a GPU (:func:`cp_core.pipeline._run_chunks`).

A CPU run cannot see a missing stream dependency: every stream is the same host thread. Here one stream is
held back with ``torch.cuda._sleep`` (a spin kernel) so that each ordering the pipeline relies on is the only
thing between a right and a wrong result:

* the compute stream waits for chunk ``j``'s transfer (``main.wait_event(ready_j)``): the transfer is slow;
* the communication stream waits for chunk ``j``'s compute before sending it (``side.wait_event``): the
  compute is slow;
* a transfer's buffer, allocated on the communication stream and read by the compute stream, is not
  reused before that read (``a.record_stream(main)``): the compute is slow and the communication stream
  allocates and scribbles right after;
* a compute result read by a later, slow transfer is not reused by the next chunk's compute
  (``b.record_stream(side)``), three chunks.

Each would pass without the delay whatever the code does; with it, removing the wait or the
``record_stream`` makes the result wrong (``scripts/mutants.py`` lists these mutants)."""

from types import SimpleNamespace

import pytest
import torch

from cp_core.pipeline import _run_chunks

pytestmark = pytest.mark.gpu

N = 1 << 20  # elements per chunk
SPIN = 50_000_000  # cycles of torch.cuda._sleep: tens of milliseconds, far longer than a copy of N floats


def _spec(k):
    return SimpleNamespace(chunks=k, overlap=True)


def _check(outs, src, k):
    torch.cuda.synchronize()
    for j in range(k):
        want = (src[j] * 2 + 1) * 3
        assert torch.equal(outs[j], want), f"chunk {j}: {(outs[j] - want).abs().max().item()}"


def _run(k, slow: str):
    dev = torch.device("cuda")
    src = [torch.full((N,), float(j + 1), device=dev) for j in range(k)]
    outs = tuple(torch.zeros(N, device=dev) for _ in range(k))

    def pre(j):  # on the communication stream: the "transfer" of chunk j's input
        if slow == "pre":
            torch.cuda._sleep(SPIN)
        return src[j] * 2

    def compute(j, a):  # on the compute stream
        if slow in ("compute", "compute+scribble"):
            torch.cuda._sleep(SPIN)
        b = a + 1
        if slow == "post":  # the next chunk's compute allocates (and writes) while chunk j's post still reads
            torch.full((N,), -7.0, device=dev)
        return b

    def post(j, b):  # on the communication stream: the "return transfer" into chunk j's output
        if slow == "post":
            torch.cuda._sleep(SPIN)
        outs[j].copy_(b * 3)

    torch.cuda.synchronize()
    _run_chunks(_spec(k), pre, compute, post, outs)
    if slow == "compute+scribble":
        # the communication stream allocates right away: without a.record_stream(main) it gets the freed
        # transfer buffers while the slow compute has not read them yet
        from cp_core.pipeline import comm_stream

        with torch.cuda.stream(comm_stream(dev)):
            for _ in range(4 * k):
                torch.full((N,), -9.0, device=dev)
    _check(outs, src, k)


def test_compute_waits_for_a_slow_transfer():
    _run(2, "pre")


def test_transfer_waits_for_a_slow_compute():
    _run(2, "compute")


def test_transfer_buffers_outlive_a_slow_compute():
    _run(2, "compute+scribble")


def test_compute_results_outlive_a_slow_return_transfer():
    _run(3, "post")
