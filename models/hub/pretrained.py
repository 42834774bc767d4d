"""``load_pretrained`` / ``save_pretrained``: Hugging Face causal-LM checkpoint folders <-> ``(LM, params)``.

    model, params, tokenizer = load_pretrained("path/to/Llama-3.2-1B", dtype="bfloat16")
    logits, _ = model.apply({"params": params}, tokens)
    out = sample(model, params, prompts, key, max_new_tokens=32, temperature=0)   # models.sampling
    save_pretrained(model, params, "out/", tokenizer)     # transformers.AutoModelForCausalLM loads it

Loading reads ``config.json`` (:mod:`.config_map`), then each parameter from the safetensors files
(:mod:`.safetensors_io`: each header parsed once, then one tensor at a time by a plain read; :mod:`.weights`
has the name and layout maps), casts it and places it on its device at once: with a mesh, directly onto its
``NamedSharding`` (``jax.device_put`` per tensor), so no host or device ever holds the whole checkpoint
unsharded.

Shardings. ``mesh`` alone places every tensor by ``models.lm.param_logical_axes`` and the repository's rule
table (``models.axes.LOGICAL_AXIS_RULES``, restricted to the axes the mesh splits), through
``flax.linen.logical_to_mesh_sharding``; ``rules`` (or the rules active through ``nn.logical_axis_rules``)
replace the table; ``shardings`` gives a tree of ``jax.sharding.Sharding`` with the parameters' structure
instead.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.models.axes import rules_for_mesh
from jaxlab.models.hub.config_map import checkpoint_dtype, hf_config, infer_architecture, lm_config
from jaxlab.models.hub.safetensors_io import CheckpointReader, write_checkpoint
from jaxlab.models.hub.tokenizer import TOKENIZER_FILE, HFTokenizer
from jaxlab.models.hub.weights import IGNORED_SUFFIXES, tensor_maps
from jaxlab.models.layers import DTYPES
from jaxlab.models.lm import LM, LMConfig, param_logical_axes, scan_to_unrolled

__all__ = ["load_pretrained", "save_pretrained"]

CONFIG_FILE = "config.json"
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def _dtype_name(dtype) -> str | None:
    if dtype is None:
        return None
    for name, value in DTYPES.items():
        try:
            if dtype == name or jnp.dtype(dtype) == jnp.dtype(value):
                return name
        except TypeError:
            break
    raise ValueError(f"dtype={dtype!r} must be None or one of {tuple(DTYPES)}")


def _leaf_paths(tree) -> list[tuple[str, ...]]:
    return [tuple(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def load_pretrained(path, *, dtype=None, mesh=None, rules=None, shardings=None, scan_layers: bool = False,
                    **config_overrides):
    """``(LM, params, tokenizer)`` of a Hugging Face checkpoint folder (Llama 2/3, Qwen2, Mistral, GPT-2).

    Args:
      path: folder with ``config.json`` and ``model.safetensors`` or shards with
        ``model.safetensors.index.json`` (and optionally ``tokenizer.json``).
      dtype: parameter and compute dtype ("float32", "bfloat16", "float16" or the jnp dtype); None: the
        checkpoint's own (its config's ``dtype``, else its stored tensors').
      mesh, rules: place each parameter on ``NamedSharding(mesh, spec)`` from its logical axes and the rules
        (default the active ``nn.logical_axis_rules``, else ``models.axes.LOGICAL_AXIS_RULES`` on this mesh:
        heads, MLP units and vocabulary over ``model``).
      shardings: instead of mesh/rules, a tree of ``Sharding``s with the structure of the parameters.
      scan_layers: return the stacked layout of ``LMConfig.scan_layers`` (blocks on a leading axis).
      config_overrides: further ``LMConfig`` fields (``attention_impl``, ``remat``, ``max_len``, ...).

    Returns:
      the model, its parameters (plain arrays) and an :class:`HFTokenizer` (None without ``tokenizer.json``).

    Raises:
      FileNotFoundError: no folder / config.json / weights, or a shard the index lists is missing.
      ValueError: an unsupported architecture or option, a corrupt file, a missing, unexpected or
        misshapen tensor (each names the file, tensor or architecture).
    """
    folder = pathlib.Path(path)
    config_path = folder / CONFIG_FILE
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} does not exist")
    try:
        hf = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: not JSON ({e})") from None
    with CheckpointReader(folder) as reader:
        name = _dtype_name(dtype) or checkpoint_dtype(hf)
        if name is None:
            stored = {reader.dtype(n) for n in reader.names()}
            name = SAFETENSORS_DTYPES.get(stored.pop()) if len(stored) == 1 else "float32"
        cfg = lm_config(hf, dtype=name or "float32", source=str(config_path), **config_overrides)
        arch = hf["architectures"][0]
        model = LM(cfg)
        params = _read_params(reader, cfg, arch, model, mesh, rules, shardings, scan_layers)
    tokenizer = HFTokenizer.from_pretrained(folder) if (folder / TOKENIZER_FILE).exists() else None
    if scan_layers:
        model = LM(dataclasses.replace(cfg, scan_layers=True))
    return model, params, tokenizer


def _read_params(reader: CheckpointReader, cfg: LMConfig, arch: str, model: LM, mesh, rules, shardings,
                 scan_layers: bool) -> dict:
    maps = tensor_maps(cfg, arch)
    by_name = {m.name: m for m in maps}
    if arch == "GPT2LMHeadModel" and "wte.weight" in reader.names():
        reader.add_prefix("transformer.")  # a GPT2Model checkpoint (the original GPT-2 files)
    present = reader.names()
    missing = sorted(set(by_name) - present)
    if missing:
        raise ValueError(f"{reader.folder}: {arch} checkpoint lacks tensors {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}")
    optional = {"lm_head.weight"} if cfg.tie_embeddings else set()
    extra = sorted(n for n in present - set(by_name) - optional if not n.endswith(IGNORED_SUFFIXES))
    if extra:
        raise ValueError(f"{reader.folder}: unexpected tensors {extra[:8]}{' ...' if len(extra) > 8 else ''} for "
                         f"{arch} with this config")
    for m in maps:
        if reader.shape(m.name) != m.shape:
            raise ValueError(f"{reader.folder / reader.location[m.name]}: tensor {m.name!r} has shape "
                             f"{reader.shape(m.name)}, {arch} with this config expects {m.shape}")
    source = {p: (m, j) for m in maps for j, p in enumerate(m.params)}  # unrolled param path -> (map, output)

    target = LM(dataclasses.replace(cfg, scan_layers=scan_layers))
    abstract = jax.eval_shape(lambda: nn.unbox(target.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))))
    abstract = abstract["params"]
    if shardings is None and mesh is not None:
        active = tuple(nn.get_logical_axis_rules()) if rules is None else tuple(rules)
        if not active:  # the repository's table, restricted to the axes this mesh splits
            active = rules_for_mesh(mesh)
        shardings = nn.logical_to_mesh_sharding(param_logical_axes(target), mesh, active)
    elif shardings is not None and jax.tree.structure(shardings) != jax.tree.structure(abstract):
        raise ValueError(f"shardings has structure {jax.tree.structure(shardings)}, the parameters "
                         f"{jax.tree.structure(abstract)}")
    storage = cfg.storage_dtype
    cache: dict = {}

    def unrolled(path):
        m, j = source[path]
        if cache.get("name") != m.name:  # a fused tensor (GPT-2's c_attn) feeds several parameters in a row
            cache.clear()
            cache.update(name=m.name, parts=m.to_params(reader.get(m.name)))
        return cache["parts"][j]

    params: dict = {}
    for path in _leaf_paths(abstract):
        if scan_layers and path[0] == "blocks":
            P = cfg.group_size
            j = int(path[1].removeprefix("block_"))
            value = np.stack([unrolled((f"block_{g * P + j}", *path[2:]))
                              for g in range(cfg.num_layers // P)])  # [G, ...]
        else:
            value = unrolled(path)
        want = _get(abstract, path)
        if value.shape != want.shape:  # the maps and the model disagree: a bug here, not in the file
            raise ValueError(f"parameter {'/'.join(path)} maps to shape {value.shape}, the model has {want.shape}")
        value = np.asarray(value).astype(storage, copy=False)  # the read buffer itself when no cast is needed
        _set(params, path, jax.device_put(value, None if shardings is None else _get(shardings, path)))
    return params


def save_pretrained(model: LM, params, path, tokenizer: HFTokenizer | None = None, *,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, architecture: str | None = None) -> list[str]:
    """Write ``model``/``params`` as a Hugging Face checkpoint folder: ``config.json`` (with ``architectures``),
    ``model.safetensors`` or shards of at most ``max_shard_bytes`` with ``model.safetensors.index.json``, and
    the tokenizer's files when given. ``architecture`` defaults to the one the config's layout has
    (:func:`.config_map.infer_architecture`). Tensors keep the parameters' dtype; one parameter at a time is
    copied to the host. Returns the files written."""
    cfg = model.cfg
    arch = architecture or infer_architecture(cfg)
    config = hf_config(cfg, arch)
    if cfg.scan_layers:
        params = scan_to_unrolled(params, cfg)
    maps = tensor_maps(cfg, arch)
    wanted = {p for m in maps for p in m.params}
    have = set(_leaf_paths(params))
    if have != wanted:
        raise ValueError(f"params do not match {arch}'s layout of this config: missing "
                         f"{sorted('/'.join(p) for p in wanted - have)[:8]}, unexpected "
                         f"{sorted('/'.join(p) for p in have - wanted)[:8]}")
    dtypes = {str(_get(params, p).dtype) for p in wanted}
    if len(dtypes) == 1:
        config["dtype"] = config["torch_dtype"] = dtypes.pop()
    folder = pathlib.Path(path)
    folder.mkdir(parents=True, exist_ok=True)

    def tensors():
        for m in maps:
            parts = [np.asarray(jax.device_get(_get(params, p))) for p in m.params]
            yield m.name, m.from_params(*parts)

    files = write_checkpoint(tensors(), folder, max_shard_bytes)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    files.append(CONFIG_FILE)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
        files += [TOKENIZER_FILE, "tokenizer_config.json"]
    return files
