"""The configuration of :class:`jaxlab.models.lm.LM`: one frozen dataclass, validated on construction (errors
name the fields), with the values derived from it (head and feed-forward sizes, the resolved dtypes), and the
names of the choices it offers (``MIXERS``, ``FFNS``, ``POSITION_EMBEDDINGS``). :mod:`jaxlab.models.lm`
re-exports all of it.

    cfg = LMConfig(vocab_size=256, d_model=128, num_layers=2, num_heads=4, mixer="mamba2")
"""

from __future__ import annotations

import dataclasses

from jaxlab.kernels.attention import IMPLEMENTATIONS
from jaxlab.models.layers import NORMS, ResolvedDtypes, RopeScaling, resolve_dtype
from jaxlab.models.linear_mixers import FEATURE_MAPS
from jaxlab.models.moe import BALANCE, DISPATCH, GATES
from jaxlab.models.remat import validate_remat
from jaxlab.models.sparse_mixers import SPARSE_PATTERNS
from jaxlab.validation import check_choice, check_greater, check_positive

__all__ = ["FFNS", "LMConfig", "MIXERS", "POSITION_EMBEDDINGS", "RESIDUAL_AXES"]

MIXERS = ("attention", "sliding", "linear", "gau", "s4d", "s5", "mamba", "mamba2", "rwkv", "retnet", "lru", "s4",
          "sparse", "lsh")
FFNS = ("swiglu", "gelu", "gelu_tanh", "moe")
POSITION_EMBEDDINGS = ("rope", "learned")
RESIDUAL_AXES = ("batch", "length", "embed")
"""Logical axes of the residual stream [B, L, d_model], constrained at every block boundary."""


@dataclasses.dataclass(frozen=True)
class LMConfig(ResolvedDtypes):
    """Configuration of :class:`LM`; validated on construction (errors name the fields)."""

    vocab_size: int = 256
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None
    """Key/value heads of attention (None: num_heads, MHA; 1: MQA; otherwise GQA)."""
    mixer: str = "attention"
    mixer_pattern: tuple[str, ...] | None = None
    """Hybrid stacks: layer i uses ``mixer_pattern[i % len(mixer_pattern)]`` (e.g. Jamba-style
    ``("mamba", "mamba", "mamba", "attention")``); None: ``mixer`` in every layer."""
    ffn: str = "swiglu"
    num_experts: int = 8
    num_shared_experts: int = 1
    experts_per_token: int = 2
    """Routed experts per token (MoE), the k of top-k routing."""
    remat: str | tuple[str, ...] = "none"
    """"none" | "full" | "dots" | "offload" | a tuple of names from ``remat.CHECKPOINT_NAMES``."""
    scan_layers: bool = False
    """Run the blocks as one ``nn.scan`` over parameters stacked on a leading layer axis (MaxText's layout):
    one compiled block instead of ``num_layers``, and under ``remat`` the backward pass recomputes one
    scanned step at a time. With a ``mixer_pattern`` one scanned step is one repetition of the pattern."""
    attention_impl: str = "auto"
    qk_norm: bool = False
    tie_embeddings: bool = True
    embed_init_std: float = 0.02
    """Standard deviation of the token embedding's normal init (GPT-2's 0.02). The projections are
    LeCun-normal, so every block adds O(1) to the residual stream and a 0.02 embedding is 2% of it after the
    first block: models trained from scratch that must read their token's identity in a later layer (the
    synthetic recall tasks) may need 1.0, the scale of the normalised activations (and then untied
    embeddings, or the tied logits start at std sqrt(d_model))."""
    max_len: int = 2048
    """Longest sequence (training rows and prompt + generated tokens)."""
    dtype: str = "float32"
    param_dtype: str = "float32"
    # ---- finer knobs ----------------------------------------------------------------------------
    d_ff: int | None = None
    """Dense FFN hidden size (None: 4 d_model for gelu, 8/3 d_model rounded up to a multiple of 8 for swiglu)."""
    d_expert: int | None = None
    """Hidden size of one routed expert (None: d_ff // (experts_per_token + num_shared_experts), so active FLOPs
    match d_ff)."""
    moe_gate: str = "softmax"
    moe_dispatch: str = "ragged"
    """"ragged" (sort + grouped matmul, dropless; expert parallel with all-to-all under a mesh with an ``expert``
    axis) or "dense" (every expert on every token; the reference)."""
    moe_capacity_factor: float | None = None
    """Expert parallel only: room per destination device for ``capacity_factor`` times the balanced share of
    token-expert assignments, overflow dropped and counted in ``aux["dropped_fraction"]`` (None: dropless)."""
    load_balance_coef: float = 0.01
    router_z_coef: float = 1e-3
    moe_balance: str = "aux_loss"
    """"aux_loss" (Switch's load-balance loss, weighted by ``load_balance_coef``) or "bias" (DeepSeek-V3's
    auxiliary-loss-free balancing: a per-expert ``router_bias`` on the scores that choose the experts,
    updated by sign descent on the load; the optimizer must take ``router_bias`` by ``sign_descent``, see
    :func:`jaxlab.models.lm_training.make_lm_optimizer`; the balance loss is then reported, not added)."""
    moe_bias_rate: float = 1e-3
    """Sign-descent step of ``router_bias`` per optimizer step (DeepSeek-V3's bias update speed gamma)."""
    window: int = 128
    """Keys seen by each query of the "sliding" mixer (itself included)."""
    rope_base: float = 10000.0
    rope_scaling: RopeScaling | None = None
    """Llama 3.1's rescaling of the rotary frequencies (``models.layers.RopeScaling``: factor,
    low_freq_factor, high_freq_factor, original_max_position_embeddings); None: plain RoPE."""
    position_embedding: str = "rope"
    """"rope" (rotary, inside attention) or "learned" (GPT-2: a trained [max_len, d_model] table added to the
    token embedding; attention then has no rotary positions)."""
    norm: str = "rms"
    """"rms" (RMSNorm) or "layer" (LayerNorm with a bias, GPT-2) for the block and final norms."""
    norm_eps: float = 1e-6
    d_head: int | None = None
    """Attention head dim D (Hugging Face's ``head_dim``) when it differs from d_model // num_heads (None);
    "attention" and "sliding" mixers only."""
    qkv_bias: bool = False
    """Biases on the query/key/value projections (Qwen2, GPT-2)."""
    attn_out_bias: bool = False
    """A bias on the attention output projection (GPT-2)."""
    mlp_bias: bool = False
    """Biases on the dense feed-forward's projections (GPT-2)."""
    feature_map: str = "elu"
    """Linear attention feature map: "elu" (elu + 1) or "favor" (Performer FAVOR+)."""
    num_features: int = 64
    """Random features per head of FAVOR+."""
    feature_redraw: int | None = None
    """Redraw FAVOR+'s random features every this many training steps (Performer, Section 4.2; the trainer
    applies ``models.linear_mixers.redraw_favor_projections``); None: drawn once at init. Needs a "linear"
    mixer with feature_map="favor"."""
    sparse_pattern: str = "strided"
    """Pattern of the "sparse" mixer (Sparse Transformer, merged head): "strided" (the last ``sparse_stride``
    tokens or every sparse_stride-th) | "fixed" (own block of ``sparse_stride`` tokens or the last
    ``sparse_summary`` tokens of every block)."""
    sparse_stride: int = 16
    """Stride (block length) of the "sparse" mixer's pattern."""
    sparse_summary: int = 1
    """Summary tokens per block of the "fixed" pattern (<= sparse_stride)."""
    lsh_buckets: int = 8
    """Hash buckets per round of the "lsh" mixer (Reformer; 1 or even)."""
    lsh_chunk: int = 32
    """Chunk length of the "lsh" mixer's sorted sequence (a query sees its chunk and the previous one)."""
    lsh_rounds: int = 2
    """Hashing rounds of the "lsh" mixer."""
    d_state: int = 16
    """State size N of the SSM mixers."""
    d_conv: int = 4
    expand: int = 2
    """Inner width of Mamba / Mamba-2 / GAU: expand * d_model; RetNet's value width over its query width; the
    LRU's complex modes per channel."""
    ssm_head_dim: int = 16
    """Mamba-2 head dim P (expand * d_model must be a multiple)."""
    chunk_size: int = 64
    """Chunk length of the chunked kernels (SSD, GAU)."""
    gau_qk_dim: int = 64
    """GAU's shared query/key dim s."""

    def __post_init__(self):
        check_positive(self, "vocab_size", "d_model", "num_layers", "num_heads", "num_experts", "experts_per_token",
                       "max_len", "window", "num_features", "d_state", "d_conv", "expand", "ssm_head_dim",
                       "chunk_size", "gau_qk_dim", "sparse_stride", "sparse_summary", "lsh_chunk", "lsh_rounds",
                       integer=True)
        for name in ("num_kv_heads", "d_ff", "d_expert", "d_head"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be None or a positive int")
        if self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts={self.num_shared_experts} must be >= 0")
        if self.mixer not in MIXERS:
            raise ValueError(f"mixer={self.mixer!r} must be one of {MIXERS}")
        if self.mixer_pattern is not None and (not isinstance(self.mixer_pattern, tuple) or not self.mixer_pattern
                                               or any(m not in MIXERS for m in self.mixer_pattern)):
            raise ValueError(f"mixer_pattern={self.mixer_pattern!r} must be None or a non-empty tuple of {MIXERS}")
        if self.ffn not in FFNS:
            raise ValueError(f"ffn={self.ffn!r} must be one of {FFNS}")
        check_choice(self, "position_embedding", POSITION_EMBEDDINGS)
        check_choice(self, "norm", NORMS)
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(f"rope_scaling={self.rope_scaling!r} must be None or a models.layers.RopeScaling")
        if self.mlp_bias and self.ffn == "moe":
            raise ValueError("mlp_bias=True applies to the dense feed-forwards, not ffn='moe'")
        if self.d_head is None and self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by num_heads={self.num_heads}")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        mixers = set(self.layer_mixers)
        if self.d_head is not None and mixers - {"attention", "sliding"}:
            raise ValueError(f"d_head={self.d_head} applies to the attention mixers only, not {sorted(mixers)}")
        if mixers & {"attention", "sliding", "linear", "retnet", "sparse", "lsh"} and self.head_dim % 2:
            raise ValueError(f"head dim (d_head, or d_model // num_heads) = {self.head_dim} must be even for "
                             f"rotary embeddings ({self.d_model=}, {self.num_heads=}, {self.d_head=})")
        if self.experts_per_token > self.num_experts:
            raise ValueError(f"experts_per_token={self.experts_per_token} must be <= num_experts={self.num_experts}")
        if self.moe_gate not in GATES:
            raise ValueError(f"moe_gate={self.moe_gate!r} must be one of {GATES}")
        check_choice(self, "moe_dispatch", DISPATCH)
        if self.moe_capacity_factor is not None:
            check_greater(self, "moe_capacity_factor")
        check_greater(self, "embed_init_std")
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map={self.feature_map!r} must be one of {FEATURE_MAPS}")
        if self.feature_redraw is not None:
            check_positive(self, "feature_redraw", integer=True)
            if "linear" not in mixers or self.feature_map != "favor":
                raise ValueError(f"feature_redraw={self.feature_redraw} needs a 'linear' mixer with feature_map="
                                 f"'favor' (got feature_map={self.feature_map!r}, mixers {sorted(mixers)})")
        check_choice(self, "sparse_pattern", SPARSE_PATTERNS)
        if self.sparse_pattern == "fixed" and self.sparse_summary > self.sparse_stride:
            raise ValueError(f"sparse_summary={self.sparse_summary} must be <= sparse_stride={self.sparse_stride}")
        if not (isinstance(self.lsh_buckets, int) and not isinstance(self.lsh_buckets, bool)
                and (self.lsh_buckets == 1 or (self.lsh_buckets >= 2 and self.lsh_buckets % 2 == 0))):
            raise ValueError(f"lsh_buckets={self.lsh_buckets!r} must be 1 or an even int >= 2")
        if "mamba2" in mixers and (self.expand * self.d_model) % self.ssm_head_dim:
            raise ValueError(f"expand * d_model = {self.expand * self.d_model} must be divisible by "
                             f"ssm_head_dim={self.ssm_head_dim} ({self.expand=}, {self.d_model=})")
        if self.attention_impl not in IMPLEMENTATIONS:
            raise ValueError(f"attention_impl={self.attention_impl!r} must be one of {IMPLEMENTATIONS}")
        check_choice(self, "moe_balance", BALANCE)
        check_greater(self, "moe_bias_rate")
        if self.load_balance_coef < 0 or self.router_z_coef < 0:
            raise ValueError(f"{self.load_balance_coef=} and {self.router_z_coef=} must be >= 0")
        if self.scan_layers and self.num_layers % self.group_size:
            raise ValueError(f"scan_layers=True scans whole repetitions of mixer_pattern={self.mixer_pattern}: "
                             f"num_layers={self.num_layers} must be a multiple of {self.group_size} "
                             f"(or use scan_layers=False)")
        validate_remat(self.remat)
        resolve_dtype(self.dtype, "dtype")
        resolve_dtype(self.param_dtype, "param_dtype")

    # ---- derived values -------------------------------------------------------------------------
    @property
    def layer_mixers(self) -> tuple[str, ...]:
        """The mixer of every layer."""
        pattern = self.mixer_pattern or (self.mixer,)
        return tuple(pattern[i % len(pattern)] for i in range(self.num_layers))

    @property
    def group_size(self) -> int:
        """Blocks per scanned step: the length of ``mixer_pattern`` (1 without one)."""
        return len(self.mixer_pattern) if self.mixer_pattern else 1

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def head_dim(self) -> int:
        """Attention head dim: ``d_head``, or d_model // num_heads without it."""
        return self.d_model // self.num_heads if self.d_head is None else self.d_head

    @property
    def ffn_hidden(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.ffn in ("gelu", "gelu_tanh"):
            return 4 * self.d_model
        return -(-(8 * self.d_model // 3) // 8) * 8

    @property
    def expert_hidden(self) -> int:
        if self.d_expert is not None:
            return self.d_expert
        return max(1, self.ffn_hidden // (self.experts_per_token + self.num_shared_experts))
