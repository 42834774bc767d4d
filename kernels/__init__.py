"""Pure array -> array ops: exact, Flash and ring (context-parallel) attention, linear attention, linear
recurrences, SSM scans.

Every fast path has an ``*_reference`` beside it in the same module. Import the submodules
directly (``from jaxlab.kernels.attention import dot_product_attention``). One vocabulary across them:
``method`` (how an op is computed; ``method="auto"`` resolves through ``scan.auto_method``),
``discretization`` (ZOH, bilinear, Euler), ``initial_state``, ``window=W`` (W keys per query, its own
included) and ``scan.segment_starts`` (True at t = 0).
"""
