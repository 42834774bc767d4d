"""The original encoder-decoder Transformer (Vaswani et al. 2017, "Attention Is All You Need").

Encoder layer: self-attention, feed-forward; decoder layer: causal self-attention, cross-attention to
the encoder output ("memory"), feed-forward. Every sub-layer is wrapped in a residual connection with
layer normalisation, either after the addition as in the paper (``norm="post"``,
``LayerNorm(x + Dropout(Sublayer(x)))``, §3.1 and §5.4) or before the sub-layer (``norm="pre"``,
``x + Dropout(Sublayer(LayerNorm(x)))``, Xiong et al. 2020, with a final LayerNorm per stack).
Inputs are embeddings scaled by ``sqrt(d_model)`` plus the sinusoidal encodings of §3.5, followed by
dropout; the target embedding doubles as the output projection (§3.4, ``share_embeddings``).

Masks: ``pad_id`` tokens of the source are hidden from every query (encoder self-attention and
cross-attention) through the attention kernel's key segment ids; the decoder is causal.

    cfg = TransformerConfig(src_vocab_size=32, tgt_vocab_size=32, d_model=64, num_heads=4,
                            num_encoder_layers=2, num_decoder_layers=2, d_ff=128)
    model = Transformer(cfg)
    params = nn.unbox(model.init(key, src, tgt_in))["params"]   # src [B, Ls], tgt_in [B, Lt] int32; plain arrays
    logits = model.apply({"params": params}, src, tgt_in)     # [B, Lt, V_tgt] fp32
    tokens = greedy_decode(model, params, src, max_new_tokens=16)  # [B, 16], pad after EOS
    tokens, scores = beam_search(model, params, src, max_new_tokens=16, beam_size=4, alpha=0.6)

``tgt_in`` is the target shifted right behind ``bos_id``; :func:`seq2seq_loss` is the label-smoothed
cross-entropy of §5.4 over non-pad targets.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxlab.kernels.attention import IMPLEMENTATIONS
from jaxlab.models.attention import Attention, KVCache
from jaxlab.models.layers import FeedForward, ResolvedDtypes, resolve_dtype, sinusoidal_positions
from jaxlab.validation import check_positive

__all__ = ["NORMS", "Transformer", "TransformerConfig", "beam_search", "greedy_decode", "seq2seq_loss",
           "shift_right"]

NORMS = ("post", "pre")


@dataclasses.dataclass(frozen=True)
class TransformerConfig(ResolvedDtypes):
    """Configuration of :class:`Transformer`; defaults are the paper's base model (Table 3)."""

    src_vocab_size: int = 32000
    tgt_vocab_size: int = 32000
    d_model: int = 512
    num_heads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    d_ff: int = 2048
    dropout: float = 0.1
    """P_drop of sub-layer outputs and of the input embeddings (§5.4)."""
    norm: str = "post"
    """"post" (the paper: LayerNorm after the residual add) or "pre" (before each sub-layer)."""
    activation: str = "relu"
    """Feed-forward non-linearity: "relu" (the paper), "gelu" or "swiglu"."""
    share_embeddings: bool = True
    """Use the target embedding as the output projection (and the source embedding too when both
    vocabularies have the same size, as the paper's shared BPE vocabulary does)."""
    max_len: int = 512
    """Longest source or target sequence."""
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    attention_impl: str = "auto"
    layer_norm_eps: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        check_positive(self, "src_vocab_size", "tgt_vocab_size", "d_model", "num_heads", "num_encoder_layers",
                             "num_decoder_layers", "d_ff", "max_len", integer=True)
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by num_heads={self.num_heads}")
        if self.d_model % 2:
            raise ValueError(f"d_model={self.d_model} must be even (sinusoidal positions)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1)")
        if self.norm not in NORMS:
            raise ValueError(f"norm={self.norm!r} must be one of {NORMS}")
        if self.activation not in ("relu", "gelu", "swiglu"):
            raise ValueError(f"activation={self.activation!r} must be 'relu', 'gelu' or 'swiglu'")
        for name in ("pad_id", "bos_id", "eos_id"):
            value = getattr(self, name)
            if not 0 <= value < self.tgt_vocab_size:
                raise ValueError(f"{name}={value} must be in [0, tgt_vocab_size={self.tgt_vocab_size})")
        if len({self.pad_id, self.bos_id, self.eos_id}) < 3:
            raise ValueError(f"pad_id={self.pad_id}, bos_id={self.bos_id}, eos_id={self.eos_id} must differ")
        if self.attention_impl not in IMPLEMENTATIONS:
            raise ValueError(f"attention_impl={self.attention_impl!r} must be one of {IMPLEMENTATIONS}")
        resolve_dtype(self.dtype, "dtype")
        resolve_dtype(self.param_dtype, "param_dtype")


def shift_right(targets, bos_id: int):
    """Decoder input ``[bos, y_0, ..., y_{L-2}]`` for targets [B, L] (teacher forcing)."""
    return jnp.concatenate([jnp.full_like(targets[:, :1], bos_id), targets[:, :-1]], axis=1)


class _Sublayers(nn.Module):
    """Shared plumbing of both layer kinds: attention/FFN constructors and the residual wrapper."""

    cfg: TransformerConfig

    def _attention(self, causal: bool, name: str) -> Attention:
        cfg = self.cfg
        return Attention(num_heads=cfg.num_heads, causal=causal, rope_base=None, impl=cfg.attention_impl,
                         use_bias=True, dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype, name=name)

    def _ffn(self, x):
        cfg = self.cfg
        return FeedForward(cfg.d_ff, cfg.activation, use_bias=True, dtype=cfg.compute_dtype,
                           param_dtype=cfg.storage_dtype, name="ffn")(x)

    def _residual(self, x, sublayer, name: str, deterministic: bool):
        """post: ``LN(x + drop(f(x)))``; pre: ``x + drop(f(LN(x)))``. Returns (x, whatever f returns extra)."""
        cfg = self.cfg
        norm = nn.LayerNorm(cfg.layer_norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype,
                            name=f"{name}_norm")
        y, extra = sublayer(norm(x) if cfg.norm == "pre" else x)
        x = x + nn.Dropout(cfg.dropout)(y, deterministic=deterministic)
        return (norm(x) if cfg.norm == "post" else x), extra


class EncoderLayer(_Sublayers):
    @nn.compact
    def __call__(self, x, src_ids, deterministic: bool = True):
        """x [B, Ls, d]; src_ids int [B, Ls] (1 real token, 0 padding)."""
        ones = jnp.ones_like(src_ids)
        attn = self._attention(False, "self_attn")
        x, _ = self._residual(x, lambda h: attn(h, segment_ids=(ones, src_ids)), "self_attn", deterministic)
        x, _ = self._residual(x, lambda h: (self._ffn(h), None), "ffn", deterministic)
        return x


class DecoderLayer(_Sublayers):
    @nn.compact
    def __call__(self, x, memory, src_ids, cache: KVCache | None = None, deterministic: bool = True):
        """x [B, Lt, d]; memory [B, Ls, d]; with ``cache`` the self-attention continues from it."""
        self_attn, cross_attn = self._attention(True, "self_attn"), self._attention(False, "cross_attn")
        x, cache = self._residual(x, lambda h: self_attn(h, cache=cache), "self_attn", deterministic)
        q_ids = jnp.ones(x.shape[:2], jnp.int32)
        x, _ = self._residual(x, lambda h: cross_attn(h, segment_ids=(q_ids, src_ids), kv=memory), "cross_attn",
                              deterministic)
        x, _ = self._residual(x, lambda h: (self._ffn(h), None), "ffn", deterministic)
        return x, cache


class Transformer(nn.Module):
    """Encoder-decoder: ``apply(params, src [B, Ls], tgt_in [B, Lt]) -> logits [B, Lt, V_tgt]`` (fp32)."""

    cfg: TransformerConfig

    def setup(self):
        cfg = self.cfg
        init = nn.initializers.normal(cfg.d_model ** -0.5)
        embed = lambda n, name: nn.Embed(n, cfg.d_model, embedding_init=init, dtype=cfg.compute_dtype,  # noqa: E731
                                         param_dtype=cfg.storage_dtype, name=name)
        self.tgt_embed = embed(cfg.tgt_vocab_size, "tgt_embed")
        shared_src = cfg.share_embeddings and cfg.src_vocab_size == cfg.tgt_vocab_size
        self.src_embed = self.tgt_embed if shared_src else embed(cfg.src_vocab_size, "src_embed")
        self.encoder = [EncoderLayer(cfg, name=f"encoder_{i}") for i in range(cfg.num_encoder_layers)]
        self.decoder = [DecoderLayer(cfg, name=f"decoder_{i}") for i in range(cfg.num_decoder_layers)]
        if cfg.norm == "pre":  # pre-LN stacks end with a LayerNorm (post-LN layers already end normalised)
            ln = lambda name: nn.LayerNorm(cfg.layer_norm_eps, dtype=cfg.compute_dtype,  # noqa: E731
                                           param_dtype=cfg.storage_dtype, name=name)
            self.encoder_norm, self.decoder_norm = ln("encoder_norm"), ln("decoder_norm")
        if not cfg.share_embeddings:
            self.head = nn.Dense(cfg.tgt_vocab_size, use_bias=False, dtype=cfg.compute_dtype,
                                 param_dtype=cfg.storage_dtype)
        self.dropout = nn.Dropout(cfg.dropout)

    def _check(self, tokens, name: str):
        if getattr(tokens, "ndim", None) != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"{name} must be an int array [B, L], got {getattr(tokens, 'shape', tokens)}")
        if tokens.shape[1] > self.cfg.max_len:
            raise ValueError(f"{name} length {tokens.shape[1]} exceeds max_len={self.cfg.max_len}")

    def _embed(self, embed: nn.Embed, tokens, positions, deterministic: bool):
        """``E[tokens] * sqrt(d) + PE[positions]`` then dropout; tokens, positions [B, L] -> [B, L, d]."""
        d = self.cfg.d_model
        x = embed(tokens) * jnp.sqrt(jnp.float32(d)).astype(embed.dtype)
        x = x + sinusoidal_positions(positions, d).astype(x.dtype)
        return self.dropout(x, deterministic=deterministic)

    def encode(self, src, deterministic: bool = True):
        """src [B, Ls] -> (memory [B, Ls, d], src_ids [B, Ls]: 1 for tokens, 0 for ``pad_id``)."""
        self._check(src, "src")
        src_ids = (src != self.cfg.pad_id).astype(jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(src.shape[1], dtype=jnp.int32), src.shape)
        x = self._embed(self.src_embed, src, positions, deterministic)
        for layer in self.encoder:
            x = layer(x, src_ids, deterministic)
        if self.cfg.norm == "pre":
            x = self.encoder_norm(x)
        return x, src_ids

    def decode(self, tgt_in, memory, src_ids, caches=None, deterministic: bool = True):
        """Decoder logits [B, Lt, V] (fp32) for tgt_in [B, Lt] over ``memory``.

        With ``caches`` (a tuple of :class:`KVCache`, one per layer, from :meth:`init_caches`) the
        tokens continue the cached prefix at stream position ``caches[0].index``; returns
        ``(logits, caches)`` (``caches`` None without).
        """
        self._check(tgt_in, "tgt_in")
        B, Lt = tgt_in.shape
        start = 0 if caches is None else caches[0].index
        positions = start + jnp.broadcast_to(jnp.arange(Lt, dtype=jnp.int32), (B, Lt))
        x = self._embed(self.tgt_embed, tgt_in, positions, deterministic)
        new = []
        for i, layer in enumerate(self.decoder):
            x, c = layer(x, memory, src_ids, None if caches is None else caches[i], deterministic)
            new.append(c)
        if self.cfg.norm == "pre":
            x = self.decoder_norm(x)
        logits = self.tgt_embed.attend(x) if self.cfg.share_embeddings else self.head(x)
        return logits.astype(jnp.float32), (None if caches is None else tuple(new))

    def __call__(self, src, tgt_in, deterministic: bool = True):
        memory, src_ids = self.encode(src, deterministic)
        return self.decode(tgt_in, memory, src_ids, deterministic=deterministic)[0]

    @nn.nowrap
    def init_caches(self, batch: int, max_len: int) -> tuple[KVCache, ...]:
        """Empty self-attention caches of the decoder layers for ``max_len`` target tokens."""
        cfg = self.cfg
        return tuple(KVCache.zeros(batch, max_len, cfg.num_heads, cfg.d_model // cfg.num_heads, cfg.compute_dtype)
                     for _ in range(cfg.num_decoder_layers))


def seq2seq_loss(logits, targets, pad_id: int, label_smoothing: float = 0.0):
    """Mean label-smoothed cross-entropy over non-pad targets (§5.4 uses 0.1); returns (loss, accuracy)."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing!r} must be in [0, 1)")
    V = logits.shape[-1]
    labels = optax.smooth_labels(jax.nn.one_hot(targets, V), label_smoothing)  # [B, L, V]
    nll = optax.softmax_cross_entropy(logits.astype(jnp.float32), labels)  # [B, L]
    mask = (targets != pad_id).astype(jnp.float32)
    denom = jnp.maximum(mask.sum(), 1.0)
    acc = jnp.sum((jnp.argmax(logits, -1) == targets) * mask) / denom
    return jnp.sum(nll * mask) / denom, acc


# ---- decoding ---------------------------------------------------------------------------------------
def _check_decode_args(model: Transformer, src, max_new_tokens: int):
    if getattr(src, "ndim", None) != 2 or not jnp.issubdtype(src.dtype, jnp.integer):
        raise ValueError(f"src must be an int array [B, Ls], got {getattr(src, 'shape', src)}")
    if not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= model.cfg.max_len:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int in [1, cfg.max_len={model.cfg.max_len}]")


@functools.lru_cache(maxsize=32)
def _greedy_fn(cfg: TransformerConfig, max_new_tokens: int):
    model = Transformer(cfg)

    def run(params, src):
        B = src.shape[0]
        apply = functools.partial(model.apply, {"params": params})
        memory, src_ids = apply(src, method=Transformer.encode)

        def step(carry, _):
            token, done, caches = carry
            logits, caches = apply(token[:, None], memory, src_ids, caches, method=Transformer.decode)
            nxt = jnp.where(done, cfg.pad_id, jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32))
            return (nxt, done | (nxt == cfg.eos_id), caches), nxt

        start = jnp.full((B,), cfg.bos_id, jnp.int32)
        carry = (start, jnp.zeros((B,), bool), model.init_caches(B, max_new_tokens))
        _, tokens = jax.lax.scan(step, carry, None, length=max_new_tokens)
        return tokens.T  # [B, max_new_tokens]

    return jax.jit(run)


def greedy_decode(model: Transformer, params, src, max_new_tokens: int):
    """Argmax decoding with the KV cache: tokens [B, max_new_tokens] after BOS; ``pad_id`` after EOS."""
    _check_decode_args(model, src, max_new_tokens)
    return _greedy_fn(model.cfg, max_new_tokens)(params, jnp.asarray(src, jnp.int32))


@functools.lru_cache(maxsize=32)
def _beam_fn(cfg: TransformerConfig, max_new_tokens: int, K: int, alpha: float):
    model = Transformer(cfg)

    def run(params, src):
        B = src.shape[0]
        apply = functools.partial(model.apply, {"params": params})
        memory, src_ids = apply(src, method=Transformer.encode)
        memory, src_ids = jnp.repeat(memory, K, axis=0), jnp.repeat(src_ids, K, axis=0)  # [B*K, ...]
        V = cfg.tgt_vocab_size
        # a finished beam may only continue with pad, at no cost
        pad_only = jnp.full((V,), -jnp.inf).at[cfg.pad_id].set(0.0)

        def step(carry, t):
            tokens, scores, done, lengths, caches = carry  # [B, K, T], [B, K], [B, K], [B, K], caches [B*K]
            last = jnp.where(t == 0, cfg.bos_id, tokens.reshape(B * K, max_new_tokens)[:, jnp.maximum(t - 1, 0)])
            logits, caches = apply(last[:, None], memory, src_ids, caches, method=Transformer.decode)
            logp = jax.nn.log_softmax(logits[:, 0], axis=-1).reshape(B, K, V)
            logp = jnp.where(done[..., None], pad_only, logp)
            cand = (scores[..., None] + logp).reshape(B, K * V)
            scores, idx = jax.lax.top_k(cand, K)  # [B, K]
            beam, token = idx // V, (idx % V).astype(jnp.int32)
            take = lambda a: jnp.take_along_axis(a, beam.reshape(B, K, *([1] * (a.ndim - 2))), axis=1)  # noqa: E731
            tokens, done_prev, lengths = take(tokens), take(done), take(lengths)
            tokens = tokens.at[:, :, t].set(token)
            lengths = lengths + (~done_prev).astype(jnp.int32)
            done = done_prev | (token == cfg.eos_id)
            rows = (jnp.arange(B)[:, None] * K + beam).reshape(-1)  # [B*K] source row of each new beam
            caches = jax.tree.map(lambda c: jnp.take(c, rows, axis=0) if c.ndim else c, caches)
            return (tokens, scores, done, lengths, caches), None

        scores = jnp.tile(jnp.array([0.0] + [-jnp.inf] * (K - 1)), (B, 1))  # step 0 expands beam 0 only
        carry = (jnp.full((B, K, max_new_tokens), cfg.pad_id, jnp.int32), scores, jnp.zeros((B, K), bool),
                 jnp.zeros((B, K), jnp.int32), model.init_caches(B * K, max_new_tokens))
        (tokens, scores, _, lengths, _), _ = jax.lax.scan(step, carry, jnp.arange(max_new_tokens))
        normalised = scores / ((5.0 + lengths) / 6.0) ** alpha  # GNMT length penalty (Wu et al. 2016)
        best = jnp.argmax(normalised, axis=1)  # [B]
        return tokens[jnp.arange(B), best], normalised[jnp.arange(B), best]

    return jax.jit(run)


def beam_search(model: Transformer, params, src, max_new_tokens: int, beam_size: int = 4, alpha: float = 0.6):
    """Beam search (§6.1: beam 4, length penalty alpha = 0.6): (tokens [B, max_new_tokens], scores [B]).

    Beams are ranked by their summed log-probability while searching; the result is the final beam
    with the best length-normalised score ``log p / ((5 + |y|) / 6)^alpha``. ``beam_size=1`` is
    greedy decoding.
    """
    _check_decode_args(model, src, max_new_tokens)
    if not isinstance(beam_size, int) or not 1 <= beam_size <= model.cfg.tgt_vocab_size:
        raise ValueError(f"beam_size={beam_size!r} must be an int in [1, tgt_vocab_size]")
    if not alpha >= 0:
        raise ValueError(f"alpha={alpha!r} must be >= 0")
    return _beam_fn(model.cfg, max_new_tokens, beam_size, float(alpha))(params, jnp.asarray(src, jnp.int32))
