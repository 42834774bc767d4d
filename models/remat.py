"""Rematerialisation (activation checkpointing) policies chosen by name in a config.

A block wrapped by ``jax.checkpoint`` keeps only what its policy calls saveable for the backward
pass and recomputes the rest (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost").
The modules tag the tensors worth keeping with ``jax.ad_checkpoint.checkpoint_name``:

=================  ===============================================================================
``query_proj``     query projection [B, L, Hq, D] (attention, linear attention, GAU)
``key_proj``       key projection [B, L, Hkv, D]
``value_proj``     value projection [B, L, Hkv, D]
``context``        the mixer's per-head output before its output projection (attention/scan output)
``ssm_in``         input projection of the SSM mixers (Mamba's x/z, S4D/S5 input)
``ffn_hidden``     the feed-forward hidden activation [B, L, d_ff] (dense FFN and MoE experts)
``mixer_out``      a block's mixer output [B, L, d_model] (before the residual add)
``ffn_out``        a block's feed-forward output [B, L, d_model]
=================  ===============================================================================

Policies (``remat`` in a config):

* ``"none"``: no checkpointing; every intermediate is stored (fastest, most memory).
* ``"full"``: save nothing inside a block; only block inputs survive, the block is recomputed.
* ``"dots"``: save the outputs of matmuls without batch dimensions (the projections), recompute
  elementwise ops and attention's batched score matmuls (``dots_with_no_batch_dims_saveable``).
* ``"offload"``: every tagged tensor is moved to pinned host memory in the forward pass and brought
  back for the backward pass; device memory as in ``"full"`` without its recomputation.
* a tuple of names from the table: save exactly those (``save_only_these_names``).

Gradients are identical under every policy: only what is stored versus recomputed changes.

Where the recomputation runs is the compiler's choice. :class:`~jaxlab.models.lm.LM` unrolls its blocks in
Python, and XLA:CPU's scheduler may hoist every block's recomputation ahead of the backward pass: the
step then pays for the recomputation but saves little beyond each block's internals (temporary memory
still grows with depth at almost the uncheckpointed rate). Checkpointed blocks inside a loop
(``nn.scan`` over stacked layers, as the ``remat`` experiment builds them) recompute one block at a
time on every backend. Read ``compiled.memory_analysis()`` on the target backend before relying on it.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax

__all__ = ["CHECKPOINT_NAMES", "REMAT_PRESETS", "remat_module", "remat_policy", "validate_remat"]

CHECKPOINT_NAMES = ("query_proj", "key_proj", "value_proj", "context", "ssm_in", "ffn_hidden", "mixer_out",
                    "ffn_out")
REMAT_PRESETS = ("none", "full", "dots", "offload")


def validate_remat(remat) -> None:
    """Raise ValueError unless ``remat`` is a preset name or a non-empty tuple of known names."""
    if isinstance(remat, str):
        if remat not in REMAT_PRESETS:
            raise ValueError(f"remat={remat!r} must be one of {REMAT_PRESETS} or a tuple of names from "
                             f"{CHECKPOINT_NAMES}")
        return
    if not isinstance(remat, tuple) or not remat:
        raise ValueError(f"remat={remat!r} must be a preset name or a non-empty tuple of checkpoint names")
    unknown = [n for n in remat if n not in CHECKPOINT_NAMES]
    if unknown:
        raise ValueError(f"remat={remat!r} names unknown checkpoints {unknown}; known: {CHECKPOINT_NAMES}")


def remat_policy(remat) -> Callable | None:
    """The ``jax.checkpoint`` policy for a config value (None for ``"none"``: no checkpointing)."""
    validate_remat(remat)
    policies = jax.checkpoint_policies
    if remat == "none":
        return None
    if remat == "full":
        return policies.nothing_saveable
    if remat == "dots":
        return policies.dots_with_no_batch_dims_saveable
    if remat == "offload":
        return policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[], names_which_can_be_offloaded=list(CHECKPOINT_NAMES),
            offload_src="device", offload_dst="pinned_host")
    return policies.save_only_these_names(*remat)


def remat_module(module_cls: type[nn.Module], remat, static_argnums: tuple[int, ...] = ()) -> type[nn.Module]:
    """``module_cls`` itself for ``"none"``, else ``nn.remat(module_cls)`` under the chosen policy.

    ``static_argnums`` counts ``self`` as argument 0, as ``flax.linen.remat`` does.
    """
    policy = remat_policy(remat)
    if policy is None:
        return module_cls
    return nn.remat(module_cls, policy=policy, prevent_cse=True, static_argnums=static_argnums)
