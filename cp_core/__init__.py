"""Context parallelism for Mamba2 / SSM layers.

* :mod:`cp_core.layout`: head-tail / contiguous token layouts, ``shard`` / ``unshard``
* :mod:`cp_core.plan`: the cached token permutation around the all-to-all
* :mod:`cp_core.channels`: the channels of ``[z|x|B|C|dt]`` each rank owns, one-pass pack / unpack
* :mod:`cp_core.mamba_cp`: NeMo AutoModel's ``mamba_cp`` API (hidden-parallel CP), fused and seed paths
* :mod:`cp_core.mixer`: the Mamba2 layer with ``strategy="hidden"`` or ``"state_passing"``
* :mod:`cp_core.state_passing`: the sequence stays sharded, SSD states and a conv halo move
* :mod:`cp_core.cost`: bytes each strategy moves per layer
* :mod:`cp_core.kernels`: SSD and conv1d backends, each beside its torch reference
* :mod:`cp_core.comm`, :mod:`cp_core.regions`: collectives (and one-process ``LocalGroup``), named regions

Depends on torch only; mamba-ssm, causal-conv1d and triton are used when importable.
"""

__version__ = "0.1.0"
