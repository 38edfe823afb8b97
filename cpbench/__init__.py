"""cpbench: sweep, profile, report and compare context-parallel Mamba2 layers built with ``cp_core``.

The command line lives in :mod:`cpbench.cli` (``cpbench sweep|report|plot|compare|nsys-import``);
the modules are small and composable:

:mod:`~cpbench.scenario`   the TOML scenario schema, ``--set`` overrides, the cases of a sweep
:mod:`~cpbench.packing`    seeded packs of documents (``cu_seqlens``) for packed THD cases
:mod:`~cpbench.launcher`   torchrun / local spawn / one-process ("fake") execution, process groups
:mod:`~cpbench.sweep`      the per-rank loop over cases, agreement on errors, rows on rank 0
:mod:`~cpbench.runner`     one case on one rank: warmup, measured iterations, all-to-all microbenchmark
:mod:`~cpbench.timing`     the region hook: NVTX ranges plus CUDA-event / perf_counter timers
:mod:`~cpbench.metrics`    medians, IQRs, cross-rank max/min, algbw/busbw, modeled communication
:mod:`~cpbench.results`    the CSV (appended and fsync'ed per case) and ``meta.json``
:mod:`~cpbench.rundir`     results folders: never overwritten, locked while written, killed runs marked
:mod:`~cpbench.guard`      ranks and estimated memory against the machine, before any rank starts
:mod:`~cpbench.progress`   a progress bar on a terminal, one line per case elsewhere
:mod:`~cpbench.report`     rich tables;  :mod:`~cpbench.compare` regressions;  :mod:`~cpbench.plot` PNGs
:mod:`~cpbench.nsys`       Nsight Systems command lines and ``nvtx_gpu_proj_sum`` import
:mod:`~cpbench.errors`     user errors (exit code 2, one line, no traceback)
"""

__version__ = "0.1.0"
