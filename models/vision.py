"""Vision encoder: native-resolution images packed into rows of patches, a ViT with 2D RoPE, patch merging.

Packing (NaViT, Dehghani et al. 2023, "Patch n' Pack", §2.2): each ``[H, W, C]`` image is cut into its
``(H/P) x (W/P)`` grid of ``P x P`` patches, flattened in raster order, and the patch sequences of several
images share one row of ``L`` slots, so images keep their own resolution and aspect ratio and no compute is
spent on resizing. :func:`pack_images` places images by **first-fit decreasing**: largest first (ties in
input order), each into the first row with room, a new row when none has; inside a row the images keep
their input order. The fields follow the LM packing convention (:mod:`jaxlab.models.packing`):
``segment_ids`` are 1, 2, 3, ... per image within a row and 0 marks padding, so the attention kernel's
segment mask (``kernels.attention_masks``: query i sees key j only when the ids are equal) keeps every
image to itself. Padding slots attend only to padding; their outputs are zeroed.

Encoder (:class:`ViT`): a linear patch embedding, then pre-norm Transformer blocks
``x + Attn(LN(x))``, ``x + MLP(LN(x))`` (Xiong et al. 2020) with non-causal attention through
``jaxlab.kernels.attention.dot_product_attention(segment_ids=...)``, then a final norm.

2D rotary positions (MoonViT of Kimi-VL, Kimi Team 2025, §2.1; RoPE: Su et al. 2021, eq. 34): a head of
D channels has D/2 rotated channel pairs; the first D/4 pairs rotate by ``row * f_j`` and the last D/4 by
``col * f_j`` with ``f_j = base^(-4j / D)``, ``j < D/4`` (the frequencies of a D/2-dimensional 1D RoPE, once
per axis). Pairs use the rotate-half layout of :func:`jaxlab.models.layers.apply_rope` (channel i with
channel i + D/2) where MoonViT interleaves rows and columns on adjacent channels; the two differ by a fixed
permutation of the query/key channels. Since each pair rotates by a linear function of (row, col),
``<R(p) q, R(p') k>`` depends on the positions only through ``p - p'``.

Optional learned absolute positions (``ViTConfig.abs_pos_grid = G``, as MoonViT keeps from SigLIP): a
``[G, G, d_model]`` table, bilinearly interpolated (half-pixel centres, edges clamped: ``jax.image.resize``
with ``method="bilinear", antialias=False``) to each image's own ``(h, w)`` patch grid and added to its
patch embeddings. The grid of each patch is read from the packed row itself: ``h = 1 + max row`` and
``w = 1 + max col`` over its segment (each segment a contiguous run of slots, as packing makes them).

After the encoder, :func:`pixel_shuffle` merges each 2 x 2 block of patches of an image into one token
(space-to-depth, Kimi-VL's patch merger: ``[h*w, D] -> [(h/2)*(w/2), 4D]``) and :class:`Projector`
(LayerNorm -> Dense -> GELU -> Dense) maps the merged tokens to the LM's width.

    packed = pack_images(images, patch_size=14, max_len=1024)
    vit = ViT(ViTConfig(patch_size=14, d_model=384, num_layers=6, num_heads=6))
    variables = vit.init(key, packed.patches, packed.segment_ids, packed.positions)
    x = vit.apply(variables, packed.patches, packed.segment_ids, packed.positions)  # [B, L, d_model]
    feats = unpack_images(x, packed)                                                  # [h_i*w_i, d_model] each
    tokens = pixel_shuffle(feats[0], packed.grid_hw[0])                              # [h*w/4, 4 d_model]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.kernels.attention import IMPLEMENTATIONS, dot_product_attention
from jaxlab.kernels.scan import segment_starts
from jaxlab.models.layers import FFN_KINDS, NORMS, FeedForward, LayerNorm, Projection, make_norm, resolve_dtype, \
    rope_angles
from jaxlab.validation import check, check_choice, check_greater, check_positive

__all__ = ["PackedImages", "Projector", "ViT", "ViTConfig", "abs_pos_embedding", "apply_rope_2d", "first_fit_rows",
           "grid_sizes", "pack_images", "pixel_shuffle", "pixel_unshuffle", "rope_angles_2d", "unpack_images"]


# ---- packing --------------------------------------------------------------------------------------
class PackedImages(NamedTuple):
    """Images packed into ``B`` rows of ``L`` patch slots (a pytree: a NamedTuple of arrays).

    Attributes:
      patches: [B, L, P*P*C] flattened patches (each patch ``[P, P, C]`` row-major), zeros in padding.
      segment_ids: int32 [B, L], 1, 2, 3, ... per image within a row, 0 in padding.
      positions: int32 [B, L, 2], the (row, col) of each patch in its image's patch grid, (0, 0) in padding.
      image_ids: int32 [B, L], index of the image in the list given to :func:`pack_images`, -1 in padding.
      grid_hw: int32 [N, 2], each image's patch grid (h, w) = (H / P, W / P).
    """

    patches: Any
    segment_ids: Any
    positions: Any
    image_ids: Any
    grid_hw: Any

    @property
    def wasted_fraction(self) -> float:
        """Fraction of the ``B x L`` slots that hold padding (0.0: every slot holds a patch)."""
        seg = np.asarray(self.segment_ids)
        return float((seg == 0).sum() / seg.size)


def _as_image(image, index: int) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim == 2:  # greyscale [H, W] is one channel
        array = array[:, :, None]
    if array.ndim != 3:
        raise ValueError(f"images[{index}] must be [H, W, C] (or greyscale [H, W]), got shape {array.shape}")
    if min(array.shape) == 0:
        raise ValueError(f"images[{index}] is empty: shape {array.shape}")
    return array


def first_fit_rows(lengths: Sequence[int], max_len: int) -> np.ndarray:
    """The row of each item of ``lengths`` (patch counts, each <= ``max_len``) under first-fit decreasing: items
    longest first (ties in input order), each into the first row with room, a new row when none has. The rows
    :func:`pack_images` uses; ``int(first_fit_rows(...).max()) + 1`` rows in all. int64 [N]."""
    room: list[int] = []  # free slots of each open row
    row_of = np.zeros(len(lengths), np.int64)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: ties in input order
        n = lengths[i]
        row = next((r for r, free in enumerate(room) if free >= n), None)
        if row is None:
            room.append(max_len)
            row = len(room) - 1
        room[row] -= n
        row_of[i] = row
    return row_of


def pack_images(images: Sequence[Any], *, patch_size: int, max_len: int,
                num_rows: int | None = None) -> PackedImages:
    """Cut ``images`` (each ``[H, W, C]``, or greyscale ``[H, W]`` = one channel) into patches and pack
    them into rows of ``max_len`` slots by first-fit decreasing (see the module docstring).

    ``num_rows`` pads the batch with empty rows to exactly that many (a fixed shape for ``jit``); it is an
    error if the images need more. Raises ``ValueError`` naming the image and its shape for a size that is
    not a multiple of ``patch_size``, an empty image, a channel count differing from ``images[0]``'s or an
    image of more than ``max_len`` patches.
    """
    for name, value in (("patch_size", patch_size), ("max_len", max_len)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}={value!r} must be an int >= 1")
    if len(images) == 0:
        raise ValueError("images must hold at least one image, got none")
    P = int(patch_size)
    arrays = [_as_image(image, i) for i, image in enumerate(images)]
    C = arrays[0].shape[2]
    flat = []
    for i, a in enumerate(arrays):
        H, W, c = a.shape
        if c != C:
            raise ValueError(f"images[{i}] has {c} channels (shape {a.shape}), images[0] has {C}: all images "
                             "must have the same channel count")
        if H % P or W % P:
            raise ValueError(f"images[{i}] of shape {a.shape}: height and width must be multiples of "
                             f"patch_size={P}")
        h, w = H // P, W // P
        if h * w > max_len:
            raise ValueError(f"images[{i}] of shape {a.shape} has {h}x{w}={h * w} patches, more than "
                             f"max_len={max_len}")
        patches = a.reshape(h, P, w, P, C).transpose(0, 2, 1, 3, 4).reshape(h * w, P * P * C)  # [h*w, P*P*C]
        flat.append((patches, h, w))

    row_of = first_fit_rows([h * w for _, h, w in flat], max_len)
    B = int(row_of.max()) + 1
    if num_rows is not None:
        if isinstance(num_rows, bool) or not (isinstance(num_rows, (int, np.integer)) and num_rows >= B):
            raise ValueError(f"num_rows={num_rows!r}: the images need {B} rows of max_len={max_len}")
        B = int(num_rows)

    dtype = np.result_type(*arrays)
    out = PackedImages(patches=np.zeros((B, max_len, P * P * C), dtype),
                       segment_ids=np.zeros((B, max_len), np.int32),
                       positions=np.zeros((B, max_len, 2), np.int32),
                       image_ids=np.full((B, max_len), -1, np.int32),
                       grid_hw=np.array([(h, w) for _, h, w in flat], np.int32).reshape(-1, 2))
    filled = np.zeros(B, np.int64)
    count = np.zeros(B, np.int64)
    for i, (patches, h, w) in enumerate(flat):  # input order inside each row
        r, t, n = row_of[i], filled[row_of[i]], h * w
        count[r] += 1
        out.patches[r, t:t + n] = patches
        out.segment_ids[r, t:t + n] = count[r]
        out.positions[r, t:t + n] = np.stack(np.divmod(np.arange(n), w), axis=-1)  # (row, col), raster order
        out.image_ids[r, t:t + n] = i
        filled[r] += n
    return out


def unpack_images(x, packed: PackedImages) -> list:
    """The slots of each image from packed outputs ``x [B, L, ...]``: a list of ``[h_i * w_i, ...]`` in the
    order of the images given to :func:`pack_images` (host-side indices)."""
    ids = np.asarray(packed.image_ids)
    return [x[np.nonzero(ids == i)] for i in range(len(packed.grid_hw))]


# ---- positions ------------------------------------------------------------------------------------
def rope_angles_2d(positions, head_dim: int, base: float = 10000.0):
    """Angles of the 2D RoPE: [B, L, D/2] fp32 for (row, col) ``positions`` [B, L, 2]; the first D/4 pairs
    from rows, the last D/4 from columns, each with the D/4 frequencies of a D/2-wide 1D RoPE."""
    if head_dim % 4:
        raise ValueError(f"2D rotary embeddings need a head dim divisible by 4, got {head_dim=}")
    rows = rope_angles(positions[..., 0], head_dim // 2, base)  # [B, L, D/4]
    cols = rope_angles(positions[..., 1], head_dim // 2, base)  # [B, L, D/4]
    return jnp.concatenate([rows, cols], axis=-1)  # [B, L, D/2]


def apply_rope_2d(x, positions, base: float = 10000.0):
    """Rotate channel pairs ``(x_i, x_{i+D/2})`` of x [B, L, H, D] by the 2D angles of ``positions`` [B, L, 2]."""
    angles = rope_angles_2d(positions, x.shape[-1], base)[:, :, None, :]  # [B, L, 1, D/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # [B, L, H, D/2] each
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def grid_sizes(segment_ids, positions):
    """Each slot's image grid (h, w) = 1 + the largest (row, col) of its segment: int32 [B, L, 2].

    Segments are contiguous runs of equal ids (``kernels.scan.segment_starts``); padding (id 0) counts as
    a segment of its own."""
    B, L = segment_ids.shape
    run = jnp.cumsum(segment_starts(segment_ids), axis=1) - 1  # [B, L] index of the run within its row
    ids = (jnp.arange(B, dtype=jnp.int32)[:, None] * L + run).reshape(-1)  # [B*L]
    top = jax.ops.segment_max(positions.reshape(B * L, 2), ids, num_segments=B * L)  # [B*L, 2]
    return top[ids].reshape(B, L, 2) + 1


def abs_pos_embedding(table, positions, grid_hw):
    """Bilinear interpolation of a ``[G, G, D]`` table at each slot's (row, col) of its (h, w) grid:
    [B, L, D]. Half-pixel centres, edges clamped (``jax.image.resize(..., "bilinear", antialias=False)``
    of the table to ``(h, w, D)``, read at (row, col))."""
    G = table.shape[0]
    src = (positions.astype(jnp.float32) + 0.5) * (G / grid_hw.astype(jnp.float32)) - 0.5  # [B, L, 2]
    src = jnp.clip(src, 0.0, G - 1)
    lo = jnp.floor(src).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, G - 1)
    frac = (src - lo)[..., None]  # [B, L, 2, 1]
    fy, fx = frac[:, :, 0], frac[:, :, 1]  # [B, L, 1]
    top = table[lo[..., 0], lo[..., 1]] * (1 - fx) + table[lo[..., 0], hi[..., 1]] * fx  # [B, L, D]
    bottom = table[hi[..., 0], lo[..., 1]] * (1 - fx) + table[hi[..., 0], hi[..., 1]] * fx
    return top * (1 - fy) + bottom * fy


# ---- encoder --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Configuration of :class:`ViT`."""

    patch_size: int = 14
    """Patch edge P in pixels; the encoder reads patches of P*P*num_channels values."""
    d_model: int = 384
    num_layers: int = 6
    num_heads: int = 6
    num_channels: int = 3
    """Channels C of the images (3: RGB)."""
    d_ff: int | None = None
    """Hidden width of the MLP (None: 4 * d_model)."""
    mlp: str = "gelu"
    """MLP kind of ``layers.FeedForward``: "gelu", "gelu_tanh", "swiglu" or "relu"."""
    norm: str = "layer"
    """"layer" (LayerNorm, as ViT) or "rms"."""
    norm_eps: float = 1e-6
    rope_base: float = 10000.0
    """Base of the 2D rotary frequencies."""
    abs_pos_grid: int | None = None
    """Side G of a learned [G, G, d_model] absolute position table, bilinearly interpolated to each image's
    patch grid (None: 2D RoPE only)."""
    attention_impl: str = "auto"
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        check_positive(self, "patch_size", "d_model", "num_layers", "num_heads", "num_channels", integer=True)
        if self.d_ff is not None:
            check_positive(self, "d_ff", integer=True)
        if self.abs_pos_grid is not None:
            check_positive(self, "abs_pos_grid", integer=True)
        check(self.d_model % self.num_heads == 0,
              f"d_model={self.d_model} must be divisible by num_heads={self.num_heads}")
        check(self.head_dim % 4 == 0, f"head dim d_model / num_heads = {self.d_model} / {self.num_heads} = "
                                      f"{self.head_dim} must be divisible by 4 (2D RoPE: a quarter per axis and "
                                      "rotation pair)")
        check_choice(self, "mlp", FFN_KINDS)
        check_choice(self, "norm", NORMS)
        check_choice(self, "attention_impl", IMPLEMENTATIONS)
        check_greater(self, "norm_eps", "rope_base")
        resolve_dtype(self.dtype, "dtype")
        resolve_dtype(self.param_dtype, "param_dtype")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def patch_dim(self) -> int:
        """P * P * C, the length of a flattened patch."""
        return self.patch_size * self.patch_size * self.num_channels


class _SelfAttention(nn.Module):
    """Non-causal multi-head self-attention within segments, 2D RoPE on queries and keys."""

    cfg: ViTConfig

    @nn.compact
    def __call__(self, x, segment_ids, positions):
        cfg = self.cfg
        H, D = cfg.num_heads, cfg.head_dim
        dtype, param_dtype = resolve_dtype(cfg.dtype), resolve_dtype(cfg.param_dtype, "param_dtype")

        def dense(feats, axes, name, contract=1):
            return Projection(feats, axes, contract, use_bias=True, dtype=dtype, param_dtype=param_dtype, name=name)

        q = dense((H, D), ("embed", "heads", "head_dim"), "query")(x)  # [B, L, H, D]
        k = dense((H, D), ("embed", "heads", "head_dim"), "key")(x)  # [B, L, H, D]
        v = dense((H, D), ("embed", "heads", "head_dim"), "value")(x)  # [B, L, H, D]
        q, k = apply_rope_2d(q, positions, cfg.rope_base), apply_rope_2d(k, positions, cfg.rope_base)
        out = dot_product_attention(q, k, v, causal=False, segment_ids=segment_ids, impl=cfg.attention_impl)
        return dense((cfg.d_model,), ("heads", "head_dim", "embed"), "out", contract=2)(out)  # [B, L, d_model]


class _Block(nn.Module):
    """Pre-norm encoder block: ``x + Attn(norm(x))``, then ``x + MLP(norm(x))``."""

    cfg: ViTConfig

    @nn.compact
    def __call__(self, x, segment_ids, positions):
        cfg = self.cfg
        dtype, param_dtype = resolve_dtype(cfg.dtype), resolve_dtype(cfg.param_dtype, "param_dtype")
        norm = lambda name: make_norm(cfg.norm, cfg.norm_eps, dtype, param_dtype, "embed", name=name)  # noqa: E731
        x = x + _SelfAttention(cfg, name="attention")(norm("attention_norm")(x), segment_ids, positions)
        ffn = FeedForward(cfg.d_ff or 4 * cfg.d_model, cfg.mlp, use_bias=True, dtype=dtype, param_dtype=param_dtype,
                          name="mlp")
        return x + ffn(norm("mlp_norm")(x))


class ViT(nn.Module):
    """Vision Transformer encoder over packed patches (see the module docstring).

    ``__call__(patches [B, L, P*P*C], segment_ids [B, L], positions [B, L, 2]) -> [B, L, d_model]``;
    padding slots (segment id 0) give zeros.
    """

    cfg: ViTConfig

    @nn.compact
    def __call__(self, patches, segment_ids, positions):
        cfg = self.cfg
        if patches.ndim != 3 or patches.shape[-1] != cfg.patch_dim:
            raise ValueError(f"patches must be [B, L, P*P*C] = [B, L, {cfg.patch_dim}] (patch_size={cfg.patch_size}, "
                             f"num_channels={cfg.num_channels}), got shape {patches.shape}")
        B, L, _ = patches.shape
        if segment_ids.shape != (B, L):
            raise ValueError(f"segment_ids must have shape {(B, L)}, got {segment_ids.shape}")
        if positions.shape != (B, L, 2):
            raise ValueError(f"positions must have shape {(B, L, 2)} (row, col), got {positions.shape}")
        dtype, param_dtype = resolve_dtype(cfg.dtype), resolve_dtype(cfg.param_dtype, "param_dtype")
        segment_ids, positions = jnp.asarray(segment_ids, jnp.int32), jnp.asarray(positions, jnp.int32)
        x = Projection((cfg.d_model,), (None, "embed"), use_bias=True, dtype=dtype, param_dtype=param_dtype,
                       name="patch_embed")(jnp.asarray(patches, dtype))  # [B, L, d_model]
        if cfg.abs_pos_grid is not None:
            G = cfg.abs_pos_grid
            table = self.param("abs_pos", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                       (None, None, "embed")),
                               (G, G, cfg.d_model), param_dtype)
            x = x + abs_pos_embedding(table, positions, grid_sizes(segment_ids, positions)).astype(dtype)
        for i in range(cfg.num_layers):
            x = _Block(cfg, name=f"block_{i}")(x, segment_ids, positions)
        x = make_norm(cfg.norm, cfg.norm_eps, dtype, param_dtype, "embed", name="final_norm")(x)
        return jnp.where((segment_ids != 0)[..., None], x, 0)


# ---- patch merging and projection ----------------------------------------------------------------
def _check_grid(n: int, grid_hw, factor: int, what: str):
    h, w = (int(s) for s in grid_hw)
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
        raise ValueError(f"factor={factor!r} must be an int >= 1")
    if h * w != n:
        raise ValueError(f"{what}: grid_hw=({h}, {w}) has {h * w} patches, x has {n} on its token axis")
    if h % factor or w % factor:
        raise ValueError(f"grid_hw=({h}, {w}) must be divisible by factor={factor} on both sides")
    return h, w


def pixel_shuffle(x, grid_hw, factor: int = 2):
    """Merge each ``factor x factor`` block of an image's patch grid into one token (space-to-depth):
    ``x [..., h*w, D]`` (raster order) -> ``[..., (h/f)*(w/f), f*f*D]``, the block's patches concatenated
    in raster order (token (i, j) holds patches (f i + a, f j + b) at channels ``(a f + b) D ...``)."""
    h, w = _check_grid(x.shape[-2], grid_hw, factor, "pixel_shuffle")
    f, D, lead = factor, x.shape[-1], x.shape[:-2]
    x = x.reshape(*lead, h // f, f, w // f, f, D)  # [..., h/f, a, w/f, b, D]
    x = jnp.moveaxis(x, -3, -4)  # [..., h/f, w/f, a, b, D]
    return x.reshape(*lead, (h // f) * (w // f), f * f * D)


def pixel_unshuffle(x, grid_hw, factor: int = 2):
    """The inverse of :func:`pixel_shuffle`: ``[..., (h/f)*(w/f), f*f*D] -> [..., h*w, D]`` for the
    original grid ``grid_hw = (h, w)``."""
    h, w = (int(s) for s in grid_hw)
    f = factor
    _check_grid(x.shape[-2] * f * f, grid_hw, f, "pixel_unshuffle")
    if x.shape[-1] % (f * f):
        raise ValueError(f"pixel_unshuffle: channel width {x.shape[-1]} must be divisible by factor**2={f * f}")
    D, lead = x.shape[-1] // (f * f), x.shape[:-2]
    x = x.reshape(*lead, h // f, w // f, f, f, D)  # [..., h/f, w/f, a, b, D]
    x = jnp.moveaxis(x, -4, -3)  # [..., h/f, a, w/f, b, D]
    return x.reshape(*lead, h * w, D)


class Projector(nn.Module):
    """Vision-to-language projector (Kimi-VL's MLP projector, LLaVA-1.5's two-layer MLP):
    ``LayerNorm -> Dense(hidden) -> GELU -> Dense(out_features)``: ``[..., d_in] -> [..., out_features]``.

    Attributes:
      out_features: the LM's width.
      hidden: width of the hidden layer (None: the input width).
    """

    out_features: int
    hidden: int | None = None
    norm_eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.out_features < 1 or (self.hidden is not None and self.hidden < 1):
            raise ValueError(f"out_features={self.out_features}, hidden={self.hidden} must be >= 1")
        hidden = self.hidden or x.shape[-1]
        x = LayerNorm(self.norm_eps, self.dtype, self.param_dtype, "embed", name="norm")(x)
        x = Projection((hidden,), ("embed", "mlp"), use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="up")(x)  # [..., hidden]
        x = nn.gelu(x, approximate=False)
        return Projection((self.out_features,), ("mlp", "embed"), use_bias=True, dtype=self.dtype,
                          param_dtype=self.param_dtype, name="down")(x)  # [..., out_features]
