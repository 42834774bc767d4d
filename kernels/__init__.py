"""Pure array -> array ops: exact and Flash attention, linear attention, linear recurrences, SSM scans.

Every fast path has an ``*_reference`` beside it in the same module. Import the submodules
directly (``from jaxlab.kernels.attention import dot_product_attention``).
"""
