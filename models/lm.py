"""Decoder-only language model with a pluggable token mixer and feed-forward.

Pre-norm residual blocks (GPT-2/LLaMA layout)::

    x = E[tokens] (+ P[positions])     # rotary positions inside attention, or learned absolute ones (GPT-2)
    x = x + Mixer(Norm(x))             # "attention" | "sliding" | "linear" | "gau" | "s4d" | "s5" | "mamba" | "mamba2"
                                       # | "rwkv" | "retnet" | "lru" | "s4" | "sparse" | "lsh"
    x = x + FFN(Norm(x))               # "swiglu" | "gelu" | "gelu_tanh" | "moe"
    logits = Norm(x) E^T               # tied embeddings (or a separate head); Norm: RMSNorm or LayerNorm

The options that Hugging Face's Llama, Qwen2, Mistral and GPT-2 checkpoints need (``qkv_bias``,
``attn_out_bias``, ``mlp_bias``, ``position_embedding="learned"``, ``norm="layer"``, ``rope_scaling``,
``d_head``, the "sliding" mixer's ``window``) make ``jaxlab.models.hub.load_pretrained`` a name and
layout mapping; their defaults are the model above.

Every mixer has one interface, ``mixer(x, positions, segment_ids, state) -> (y, state)``: with
``state=None`` it runs a whole (possibly packed) sequence; with a state from ``init_state`` it
continues from it and returns the new state (KV cache for attention, recurrent state for the linear
mixers and SSMs), which is how :func:`jaxlab.models.sampling.sample` decodes. ``segment_ids`` make a
packed row behave like separate documents: attention masks across segments, recurrent mixers reset their
state at segment starts, and positions restart at 0 in each segment unless given. ``mixer_pattern`` builds
hybrid stacks (a different mixer per layer, e.g. Mamba layers with an attention layer every fourth).

    cfg = LMConfig(vocab_size=256, d_model=128, num_layers=2, num_heads=4, mixer="mamba2")
    model = LM(cfg)
    params = init_params(model, key, tokens)                       # plain arrays
    logits, aux = model.apply({"params": params}, tokens)
    out = sample(model, params, prompt, key, max_new_tokens=32)   # jaxlab.models.sampling

Logical axes (MaxText's scheme, for ``flax.linen.logical_axis_rules``): the token embedding is
``("vocab", "embed")``, an untied head ``("embed", "vocab")``, the norms ``("embed",)``, attention and the
dense feed-forwards Megatron's column-then-row pairs (``models.attention``, ``models.layers``), and under
``scan_layers`` every block parameter gains a leading ``"layers"`` axis. :func:`param_logical_axes` gives
the tree of ``PartitionSpec``s of logical names (``PartitionSpec()`` for a parameter without names).
Activations are constrained at the block boundaries to ``("batch", "length", "embed")`` and the logits to
``("batch", "length", "vocab")``. Under a mesh and rules::

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        logits, aux = jax.jit(model.apply)({"params": params}, tokens)

The configuration, :class:`LMConfig`, and the names of its choices live in :mod:`jaxlab.models.lm_config`.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from flax.linen.dtypes import promote_dtype
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec

from jaxlab.models.attention import Attention
from jaxlab.models.layers import FeedForward, contract_last, default_positions, embed_init, make_norm
from jaxlab.models.linear_mixers import GAU, LinearAttention
from jaxlab.models.lm_config import FFNS, MIXERS, POSITION_EMBEDDINGS, RESIDUAL_AXES, LMConfig
from jaxlab.models.moe import MoE
from jaxlab.models.remat import remat_module
from jaxlab.models.rnn_mixers import LRU, RWKV, RetNet
from jaxlab.models.s4_mixer import S4
from jaxlab.models.sparse_mixers import LSHAttention, SparseAttention
from jaxlab.models.ssm_mixers import S4D, S5, Mamba, Mamba2

__all__ = ["FFNS", "LM", "LMCache", "LMConfig", "MIXERS", "NO_DECAY_PARAMS", "POSITION_EMBEDDINGS", "RESIDUAL_AXES",
           "cross_entropy_sums", "init_params", "lm_loss", "make_mixer", "next_token_loss", "param_logical_axes",
           "scan_to_unrolled", "shifted_targets", "token_logprobs", "unrolled_to_scan"]


def make_mixer(cfg: LMConfig, mixer: str | None = None, **kwargs) -> nn.Module:
    """The token mixer ``mixer`` (default ``cfg.mixer``) as an (unbound) module configured from ``cfg``;
    ``kwargs`` go to the constructor (name, parent)."""
    mixer = cfg.mixer if mixer is None else mixer
    if mixer not in MIXERS:
        raise ValueError(f"mixer={mixer!r} must be one of {MIXERS}")
    common = dict(dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype, **kwargs)
    if mixer in ("attention", "sliding"):
        rope = cfg.position_embedding == "rope"
        return Attention(num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.d_head, causal=True,
                         window=cfg.window if mixer == "sliding" else None,
                         rope_base=cfg.rope_base if rope else None, rope_scaling=cfg.rope_scaling if rope else None,
                         qkv_bias=cfg.qkv_bias, out_bias=cfg.attn_out_bias, qk_norm=cfg.qk_norm,
                         impl=cfg.attention_impl, norm_eps=cfg.norm_eps, **common)
    if mixer == "linear":
        return LinearAttention(num_heads=cfg.num_heads, feature_map=cfg.feature_map, num_features=cfg.num_features,
                               **common)
    if mixer == "gau":
        return GAU(expand=cfg.expand, qk_dim=cfg.gau_qk_dim, chunk_size=cfg.chunk_size, **common)
    if mixer == "s4d":
        return S4D(d_state=cfg.d_state, **common)
    if mixer == "s5":
        return S5(d_state=cfg.d_state, **common)
    if mixer == "mamba":
        return Mamba(d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand, **common)
    if mixer == "mamba2":
        return Mamba2(d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand, head_dim=cfg.ssm_head_dim,
                      chunk_size=cfg.chunk_size, **common)
    if mixer == "s4":
        return S4(d_state=cfg.d_state, **common)
    if mixer in ("sparse", "lsh"):
        rope = cfg.position_embedding == "rope"
        rope_args = dict(rope_base=cfg.rope_base if rope else None, rope_scaling=cfg.rope_scaling if rope else None)
        if mixer == "sparse":
            return SparseAttention(num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, pattern=cfg.sparse_pattern,
                                   stride=cfg.sparse_stride, summary=cfg.sparse_summary, max_len=cfg.max_len,
                                   **rope_args, **common)
        return LSHAttention(num_heads=cfg.num_heads, n_buckets=cfg.lsh_buckets, chunk_len=cfg.lsh_chunk,
                            n_rounds=cfg.lsh_rounds, **rope_args, **common)
    if mixer == "rwkv":
        return RWKV(num_heads=cfg.num_heads, **common)
    if mixer == "retnet":
        return RetNet(num_heads=cfg.num_heads, expand=cfg.expand, chunk_size=cfg.chunk_size, rope_base=cfg.rope_base,
                      **common)
    return LRU(expand=cfg.expand, **common)


class Block(nn.Module):
    """Pre-norm residual block: mixer then feed-forward. Returns (x, state, aux)."""

    cfg: LMConfig
    mixer: str

    @nn.compact
    def __call__(self, x, positions, segment_ids=None, state=None):
        cfg = self.cfg
        norm = lambda name: make_norm(cfg.norm, cfg.norm_eps, cfg.compute_dtype, cfg.storage_dtype,  # noqa: E731
                                      "embed", name=name)
        residual = functools.partial(nn.with_logical_constraint, logical_axis_resources=RESIDUAL_AXES)
        x = residual(x)
        h, state = make_mixer(cfg, self.mixer, name="mixer")(residual(norm("mixer_norm")(x)), positions,
                                                            segment_ids, state)
        x = residual(x + checkpoint_name(h, "mixer_out"))
        y = residual(norm("ffn_norm")(x))
        if cfg.ffn == "moe":
            f, aux = MoE(cfg.num_experts, cfg.experts_per_token, cfg.expert_hidden, cfg.num_shared_experts,
                         gate=cfg.moe_gate, dispatch=cfg.moe_dispatch, capacity_factor=cfg.moe_capacity_factor,
                         balance=cfg.moe_balance, dtype=cfg.compute_dtype,
                         param_dtype=cfg.storage_dtype, name="moe")(y)
        else:
            f = FeedForward(cfg.ffn_hidden, cfg.ffn, use_bias=cfg.mlp_bias, dtype=cfg.compute_dtype,
                            param_dtype=cfg.storage_dtype, name="ffn")(y)
            aux = {}
        x = residual(x + checkpoint_name(f, "ffn_out"))
        aux["residual_rms"] = jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))
        return x, state, aux


class BlockGroup(nn.Module):
    """``len(mixers)`` consecutive blocks: one step of the scanned stack (``LMConfig.scan_layers``).

    ``__call__(x, positions, segment_ids, states) -> (x, (states, aux))`` in ``nn.scan``'s (carry, output) form;
    ``states`` is a tuple with one mixer state per block (None when training)."""

    cfg: LMConfig
    mixers: tuple[str, ...]

    @nn.compact
    def __call__(self, x, positions, segment_ids, states):
        new_states, auxes = [], []
        for j, mixer in enumerate(self.mixers):
            x, state, aux = Block(self.cfg, mixer, name=f"block_{j}")(
                x, positions, segment_ids, None if states is None else states[j])
            new_states.append(state)
            auxes.append(aux)
        return x, (tuple(new_states), jax.tree.map(lambda *a: jnp.stack(a), *auxes))  # aux leaves [P, ...]


def scanned_blocks(cfg: LMConfig, name: str = "blocks") -> nn.Module:
    """The scanned stack: ``num_layers / group_size`` steps of :class:`BlockGroup`, parameters stacked on a
    leading axis (logical name ``"layers"``), each step checkpointed under ``cfg.remat``; positions and segment
    ids broadcast, mixer states (decoding) scanned over their leading axis."""
    group = remat_module(BlockGroup, cfg.remat)
    stack = nn.scan(group, variable_axes={"params": 0}, split_rngs={"params": True},
                    in_axes=(nn.broadcast, nn.broadcast, 0), length=cfg.num_layers // cfg.group_size,
                    metadata_params={nn.PARTITION_NAME: "layers"})
    return stack(cfg, cfg.layer_mixers[:cfg.group_size], name=name)


def scan_to_unrolled(params: dict, cfg: LMConfig) -> dict:
    """Parameters of a ``scan_layers=True`` model in the unrolled layout (``block_{i}``, layer i = g P + j)."""
    params = dict(params)
    stacked = params.pop("blocks")
    for g in range(cfg.num_layers // cfg.group_size):
        for j in range(cfg.group_size):
            params[f"block_{g * cfg.group_size + j}"] = jax.tree.map(lambda x: x[g], stacked[f"block_{j}"])
    return params


def unrolled_to_scan(params: dict, cfg: LMConfig) -> dict:
    """The inverse of :func:`scan_to_unrolled`: ``block_{i}`` stacked into ``blocks/block_{j}`` [G, ...]."""
    params = dict(params)
    P = cfg.group_size
    layers = [params.pop(f"block_{i}") for i in range(cfg.num_layers)]
    params["blocks"] = {f"block_{j}": jax.tree.map(lambda *x: jnp.stack(x), *layers[j::P])  # [G, ...]
                        for j in range(P)}
    return params


@struct.dataclass
class LMCache:
    """Decoding state of :class:`LM`: one mixer state per layer (with ``scan_layers``: one per position in
    the mixer pattern, stacked over the scanned steps) and the stream position ``index``."""

    layers: tuple
    index: jax.Array


class LM(nn.Module):
    """Decoder-only LM: ``apply(params, tokens [B, L]) -> (logits [B, L, V] fp32, aux)``.

    ``aux``: ``load_balance_loss``, ``router_z_loss`` (means over MoE layers; 0 without MoE),
    ``aux_loss`` (their weighted sum, add it to the loss), ``expert_load`` [num_layers, E] and
    ``dropped_fraction`` (MoE; nonzero only expert parallel with ``moe_capacity_factor``), and
    ``residual_rms`` [num_layers] (RMS of the residual stream after each block).
    """

    cfg: LMConfig

    def setup(self):
        cfg = self.cfg
        token_init = nn.initializers.normal(stddev=cfg.embed_init_std)
        self.embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype,
                              embedding_init=nn.with_logical_partitioning(token_init, ("vocab", "embed")))
        if cfg.scan_layers:
            self.blocks = scanned_blocks(cfg)
        else:
            block = remat_module(Block, cfg.remat)
            self.blocks = [block(cfg, mixer, name=f"block_{i}") for i, mixer in enumerate(cfg.layer_mixers)]
        if cfg.position_embedding == "learned":
            self.pos_embed = nn.Embed(cfg.max_len, cfg.d_model, dtype=cfg.compute_dtype,
                                      param_dtype=cfg.storage_dtype,
                                      embedding_init=nn.with_logical_partitioning(embed_init, (None, "embed")))
        self.final_norm = make_norm(cfg.norm, cfg.norm_eps, cfg.compute_dtype, cfg.storage_dtype, "embed")
        if not cfg.tie_embeddings:
            self.head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype,
                                 kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                                          ("embed", "vocab")))

    def _check_tokens(self, tokens):
        if getattr(tokens, "ndim", None) != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an int array [B, L], got {getattr(tokens, 'shape', tokens)}")
        if tokens.shape[1] > self.cfg.max_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_len={self.cfg.max_len}")

    def _check_embeds(self, tokens, embeds, embeds_mask) -> None:
        """``embeds [B, L, d_model]`` and ``embeds_mask [B, L]`` for ``tokens [B, L]``: both or neither."""
        B, L = tokens.shape
        if (embeds is None) != (embeds_mask is None):
            raise ValueError("embeds and embeds_mask must be given together, got "
                             f"embeds={None if embeds is None else embeds.shape}, "
                             f"embeds_mask={None if embeds_mask is None else embeds_mask.shape}")
        if embeds is not None and (embeds.shape != (B, L, self.cfg.d_model) or embeds_mask.shape != (B, L)):
            raise ValueError(f"embeds must have shape {(B, L, self.cfg.d_model)} and embeds_mask {(B, L)} "
                             f"(tokens {tokens.shape}, d_model={self.cfg.d_model}), got embeds {embeds.shape} "
                             f"and embeds_mask {embeds_mask.shape}")

    def _run(self, tokens, positions, segment_ids, states, embeds=None, embeds_mask=None):
        # perturb: adds a zero "perturbations" variable when that collection is passed, so gradients with
        # respect to the embedded inputs (e.g. causality checks) come from jax.grad on it.
        x = self.embed(tokens)  # [B, L, d]
        if embeds is not None:  # precomputed inputs (image tokens of a VLM) where embeds_mask is set
            x = jnp.where(embeds_mask[..., None], embeds.astype(x.dtype), x)  # [B, L, d]
        if self.cfg.position_embedding == "learned":
            x = x + self.pos_embed(positions)  # [B, L, d]
        x = self.perturb("embedded", nn.with_logical_constraint(x, RESIDUAL_AXES))
        if self.cfg.scan_layers:  # states: one per group position, stacked over groups [G, ...]
            x, (new_states, aux) = self.blocks(x, positions, segment_ids, states)
            layers = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), aux)  # [G, P, ...] -> [num_layers, ...]
        else:
            new_states, auxes = [], []
            for i, block in enumerate(self.blocks):
                x, state, aux = block(x, positions, segment_ids, None if states is None else states[i])
                new_states.append(state)
                auxes.append(aux)
            layers = jax.tree.map(lambda *a: jnp.stack(a), *auxes)  # [num_layers, ...]
        x = nn.with_logical_constraint(self.final_norm(x), RESIDUAL_AXES)
        if self.cfg.tie_embeddings:  # Embed.attend's x · E^T, as a GEMM over rows off a mesh (contract_last)
            x, embedding = promote_dtype(x, self.embed.embedding, dtype=self.cfg.compute_dtype)
            logits = contract_last(x, embedding.T)  # [B, L, V]
        else:
            logits = self.head(x)  # [B, L, V]
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        return logits.astype(jnp.float32), tuple(new_states), self._collect_aux(layers), x

    def _collect_aux(self, layers):
        """The model's aux from the blocks' aux stacked over layers (each leaf ``[num_layers, ...]``)."""
        cfg = self.cfg
        aux = {"residual_rms": layers["residual_rms"]}
        if cfg.ffn == "moe":
            for name in ("load_balance_loss", "router_z_loss"):
                aux[name] = jnp.mean(layers[name])
            aux["expert_load"] = layers["expert_load"]  # [num_layers, E]
            aux["dropped_fraction"] = jnp.mean(layers["dropped_fraction"])
        else:
            aux["load_balance_loss"] = aux["router_z_loss"] = jnp.zeros((), jnp.float32)
        balance = cfg.load_balance_coef * aux["load_balance_loss"]
        if cfg.ffn == "moe" and cfg.moe_balance == "bias":  # 0 in value; router_bias's balancing gradient
            balance = jnp.mean(layers["bias_balance"])
        aux["aux_loss"] = balance + cfg.router_z_coef * aux["router_z_loss"]
        return aux

    def __call__(self, tokens, positions=None, segment_ids=None, *, embeds=None, embeds_mask=None,
                 return_hidden: bool = False):
        """tokens int [B, L]; positions int [B, L] (default: restart at 0 in every segment); segment_ids int
        [B, L] (packed documents). Same order as the mixers' ``(x, positions, segment_ids, state)``.
        Returns ``(logits [B, L, V] fp32, aux)``, or ``(logits, aux, hidden [B, L, d_model])`` with
        ``return_hidden``: the final-normed residual stream the output head reads (a pointing head's query,
        ``models.grounding``).

        ``embeds [B, L, d_model]`` with ``embeds_mask`` bool [B, L]: precomputed input embeddings (a VLM's
        image tokens, ``models.vlm``) replace the token embeddings where the mask is True; the rest of the
        forward pass is unchanged. Give both or neither (:meth:`decode` takes them too)."""
        self._check_tokens(tokens)
        B, L = tokens.shape
        if segment_ids is not None and segment_ids.shape != (B, L):
            raise ValueError(f"segment_ids must have shape {(B, L)}, got {segment_ids.shape}")
        if positions is None:
            positions = default_positions(B, L, segment_ids)
        elif positions.shape != (B, L):
            raise ValueError(f"positions must have shape {(B, L)}, got {positions.shape}")
        self._check_embeds(tokens, embeds, embeds_mask)
        logits, _, aux, hidden = self._run(tokens, positions, segment_ids, None, embeds,
                                           None if embeds_mask is None else embeds_mask.astype(bool))
        return (logits, aux, hidden) if return_hidden else (logits, aux)

    def decode(self, tokens, cache: LMCache, *, embeds=None, embeds_mask=None):
        """Continue from ``cache`` with tokens [B, L] (a prompt chunk or one token): (logits, new cache).

        ``embeds [B, L, d_model]`` with ``embeds_mask`` bool [B, L], as in :meth:`__call__`: precomputed input
        embeddings replace the token embeddings where the mask is True (a VLM's prompt with image tokens,
        prefilled by ``models.vlm_sampling``). Give both or neither."""
        self._check_tokens(tokens)
        B, L = tokens.shape
        self._check_embeds(tokens, embeds, embeds_mask)
        positions = cache.index + jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        logits, states, _, _ = self._run(tokens, positions, None, cache.layers, embeds,
                                         None if embeds_mask is None else embeds_mask.astype(bool))
        return logits, LMCache(states, cache.index + L)

    @nn.nowrap
    def init_cache(self, batch: int, max_len: int | None = None) -> LMCache:
        """An empty decoding state for ``batch`` rows of up to ``max_len`` (default cfg.max_len) tokens."""
        cfg = self.cfg
        max_len = cfg.max_len if max_len is None else max_len
        if not 1 <= max_len <= cfg.max_len:
            raise ValueError(f"max_len={max_len} must be in [1, cfg.max_len={cfg.max_len}]")
        layers = tuple(make_mixer(cfg, mixer, parent=None).init_state(batch, max_len, cfg.d_model)
                       for mixer in cfg.layer_mixers)
        if cfg.scan_layers:  # one state per group position, stacked over the groups like the parameters
            P = cfg.group_size
            layers = tuple(jax.tree.map(lambda *x: jnp.stack(x), *layers[j::P]) for j in range(P))
        return LMCache(layers, jnp.zeros((), jnp.int32))


# ---- parameters -------------------------------------------------------------------------------------
def _unboxed_init(model: LM, key, tokens, positions, segment_ids):
    return nn.unbox(model.init(key, tokens, positions, segment_ids)["params"])


_init = jax.jit(_unboxed_init, static_argnums=0)
_COMPILED_INIT: dict = {}


def init_params(model: LM, key, tokens, positions=None, segment_ids=None) -> dict:
    """The parameters of ``model`` as plain arrays (``model.init(...)["params"]`` with the logical-axis boxes
    removed), initialised for tokens int [B, L]; ``LM.apply`` takes them as they are.

    Called on arrays, it runs one compiled program (kept per model, argument shapes,
    mesh and rules); called on traced values (inside ``jit``, ``vmap``, ``eval_shape``), it becomes part of
    the caller's program. Under ``jax.set_mesh(mesh)`` and ``nn.logical_axis_rules(rules)`` every parameter
    is created with the sharding its logical names map to."""
    args = (key, tokens, positions, segment_ids)
    leaves, treedef = jax.tree.flatten(args)
    if any(isinstance(x, jax.core.Tracer) for x in leaves):
        return _init(model, *args)
    rules = tuple(tuple(rule) for rule in nn.get_logical_axis_rules())
    signature = (model, treedef, tuple((jax.typeof(x), getattr(x, "sharding", None)) for x in leaves), rules,
                 jax.sharding.get_abstract_mesh())
    if signature not in _COMPILED_INIT:
        if len(_COMPILED_INIT) >= 64:
            _COMPILED_INIT.clear()
        # XLA's default options: FAST_COMPILE changes the normal sampler's last bit, and so every run
        _COMPILED_INIT[signature] = _init.lower(model, *args).compile()
    return _COMPILED_INIT[signature](*args)


def param_logical_axes(model: LM, tokens_shape: tuple[int, int] = (1, 8)):
    """The logical axis names of every parameter: a tree of ``jax.sharding.PartitionSpec`` with the structure
    of :func:`init_params`'s (``PartitionSpec()`` for a parameter without names, ``("layers", None, ...)`` for one
    of the scanned stack). Shapes only, nothing is
    computed; the parameter shapes do not depend on ``tokens_shape`` (its length is capped at ``max_len``).
    Map them to a mesh with ``nn.logical_to_mesh_sharding(axes, mesh, rules)``."""
    B, L = tokens_shape
    tokens = jax.ShapeDtypeStruct((B, min(L, model.cfg.max_len)), jnp.int32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), tokens)
    specs = nn.get_partition_spec(abstract["params"])
    if not model.cfg.scan_layers:
        return specs

    def stacked(path, spec, leaf):  # a parameter of the scanned stack without names keeps its layer axis
        if path[0].key == "blocks" and not spec and leaf.ndim:
            return PartitionSpec("layers", *(None,) * (leaf.ndim - 1))
        return spec

    return jax.tree_util.tree_map_with_path(stacked, specs, nn.unbox(abstract["params"]),
                                            is_leaf=lambda x: isinstance(x, PartitionSpec))


# ---- optimisation -----------------------------------------------------------------------------------
NO_DECAY_PARAMS = frozenset({"bias", "scale", "conv_b", "rel_bias", "gamma", "beta",
                             "A_log", "log_A_real", "A_imag", "Lambda_re", "Lambda_im", "log_dt", "dt_bias", "D", "B", "P",
                             "favor_projection", "router_bias", "time_maa_x", "time_maa", "time_maa_w1",
                             "time_maa_w2", "time_decay", "time_decay_w1", "time_decay_w2", "time_first", "nu_log",
                             "theta_log", "gamma_log"})
"""Parameter names AdamW leaves undecayed (``jaxlab.optim.make_optimizer(cfg, no_decay=NO_DECAY_PARAMS)``):
biases and norm scales, GAU's per-dimension scales and offsets (``gamma``, ``beta``) and relative-position
bias, and the state-space dynamics, whatever their rank: decay would pull ``A`` and ``dt`` towards fixed
values and shorten or lengthen the memory (Mamba trains ``A_log``, ``D`` and ``dt_bias`` without it; S4
trains ``A``, ``B``, ``dt`` and the low-rank ``P`` of its DPLR state matrix without it). ``B`` is the S4D/S5/S4
input matrix; every other ``B`` of the models
is an activation, not a parameter. ``favor_projection`` is FAVOR+'s fixed random projection (no gradient;
decay would shrink it), and the MoE ``router_bias`` (updated by sign descent only). Everything else decays: projections (``kernel``), the embedding, the
MoE router and experts, the Mamba convolution, the S4D/S5 output matrix ``C``, the LRU's ``lru_B`` and ``lru_C``.
RWKV's token-shift mixes, decay and bonus with their LoRAs (``time_*``; RWKV-LM decays only its projections) and
the LRU's ``nu_log``, ``theta_log`` and ``gamma_log`` (its eigenvalues and their normalisation) are dynamics
too and are not decayed."""


# ---- losses -----------------------------------------------------------------------------------------
def token_logprobs(logits, targets):
    """``log p(targets[b, t] | logits[b, t])`` in fp32: [B, L, V], [B, L] -> [B, L] (targets aligned with logits)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, L, V]
    return jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]  # [B, L]


def cross_entropy_sums(logits, targets, mask):
    """``(nll_sum, correct_sum, count)`` of predicting ``targets`` from ``logits`` where ``mask`` is set.

    The one mask convention of jaxlab's LM losses: ``logits [B, L, V]``, ``targets [B, L]`` and
    ``mask [B, L]`` are aligned (position t's logits predict ``targets[:, t]``, weighted by ``mask[:, t]``).
    Sums (fp32) rather than means, so evaluation over several batches weighs every target once.
    """
    if logits.shape[:-1] != targets.shape or targets.shape != mask.shape:
        raise ValueError(f"logits {logits.shape[:-1]} + (V,), targets {targets.shape} and mask {mask.shape} "
                         f"must be aligned [B, L]")
    nll = -token_logprobs(logits, targets)  # [B, L]
    mask = mask.astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)  # [B, L]
    return jnp.sum(nll * mask), jnp.sum(correct * mask), jnp.sum(mask)


def next_token_loss(logits, targets, mask):
    """Mean cross-entropy over the masked targets (aligned with ``logits``; see :func:`cross_entropy_sums`).
    Returns ``(loss, {"accuracy", "loss_weight"})``, ``loss_weight`` the number of targets the mean is over
    (``jaxlab.train_state.LOSS_WEIGHT``: gradient accumulation weighs microbatches by it, so it equals the
    whole batch's gradient); no targets gives loss 0, not NaN."""
    nll, correct, count = cross_entropy_sums(logits, targets, mask)
    return nll / jnp.maximum(count, 1.0), {"accuracy": correct / jnp.maximum(count, 1.0), "loss_weight": count}


def shifted_targets(tokens, segment_ids=None):
    """Targets and mask of a token row for :func:`next_token_loss`: ``logits[:, :-1]`` predict
    ``tokens[:, 1:]``; a target in another segment than its position (the first token of the next packed
    document) is masked. Returns ``(targets [B, L-1], mask [B, L-1])``."""
    targets = tokens[:, 1:]
    if segment_ids is None:
        return targets, jnp.ones(targets.shape, jnp.float32)
    return targets, (segment_ids[:, 1:] == segment_ids[:, :-1]).astype(jnp.float32)


def lm_loss(model: LM, params, tokens, segment_ids=None):
    """Next-token cross-entropy of a token row plus the weighted auxiliary losses: ``(loss, metrics)``."""
    logits, aux = model.apply({"params": params}, tokens, segment_ids=segment_ids)
    targets, mask = shifted_targets(tokens, segment_ids)
    ce, metrics = next_token_loss(logits[:, :-1], targets, mask)
    loss = ce + aux["aux_loss"]
    return loss, {"cross_entropy": ce, "aux_loss": aux["aux_loss"], **metrics}
