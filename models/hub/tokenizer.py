"""Hugging Face tokenizers (``tokenizer.json``) behind the interface of jaxlab's byte tokenizer.

``jaxlab.models.corpus`` has ``encode(text) -> int array`` and ``decode(tokens) -> str`` with
``VOCAB_SIZE`` and ``PAD_ID``; :class:`HFTokenizer` has the same calls as methods, plus ``vocab_size``,
``eos_id``, ``pad_id`` and ``bos_id`` (special ids from ``tokenizer_config.json``, None when it names
none), over ``tokenizers.Tokenizer.from_file``.

Chat templates: when ``tokenizer_config.json`` (or ``chat_template.jinja``) has one,
``apply_chat_template(messages)`` renders it as ``transformers`` does (jinja2's immutable sandbox with
``trim_blocks``/``lstrip_blocks``, the ``loopcontrols`` extension, ``raise_exception``, ``tojson`` and
``strftime_now``, and the special tokens as variables). jinja2 is imported only then.
"""

from __future__ import annotations

import datetime
import json
import pathlib
from collections.abc import Sequence

import numpy as np
import tokenizers

__all__ = ["HFTokenizer", "TOKENIZER_CONFIG", "TOKENIZER_FILE"]

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
SPECIAL = ("bos_token", "eos_token", "pad_token", "unk_token")


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class HFTokenizer:
    """A ``tokenizer.json`` with its ``tokenizer_config.json`` (special tokens, chat template)."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, config: dict | None = None):
        self.tokenizer = tokenizer
        self.config = dict(config or {})
        self.special_tokens = {k: _token_text(self.config.get(k)) for k in SPECIAL}
        for key, token in self.special_tokens.items():
            if token is not None and tokenizer.token_to_id(token) is None:
                raise ValueError(f"{TOKENIZER_CONFIG}: {key}={token!r} is not in the tokenizer's vocabulary")

    @classmethod
    def from_pretrained(cls, folder: str | pathlib.Path) -> HFTokenizer:
        """The tokenizer of a checkpoint folder (``FileNotFoundError`` without ``tokenizer.json``)."""
        folder = pathlib.Path(folder)
        path = folder / TOKENIZER_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:
            raise ValueError(f"{path}: not a readable tokenizer ({e})") from None
        config = {}
        if (folder / TOKENIZER_CONFIG).exists():
            try:
                config = json.loads((folder / TOKENIZER_CONFIG).read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{folder / TOKENIZER_CONFIG}: not JSON ({e})") from None
        if "chat_template" not in config and (folder / CHAT_TEMPLATE_FILE).exists():
            config["chat_template"] = (folder / CHAT_TEMPLATE_FILE).read_text()
        return cls(tokenizer, config)

    def save_pretrained(self, folder: str | pathlib.Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``folder``."""
        folder = pathlib.Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(folder / TOKENIZER_FILE))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.config}
        (folder / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    # ---- the byte tokenizer's interface -------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def _id(self, key: str) -> int | None:
        token = self.special_tokens[key]
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def eos_id(self) -> int | None:
        return self._id("eos_token")

    @property
    def pad_id(self) -> int | None:
        return self._id("pad_token")

    @property
    def bos_id(self) -> int | None:
        return self._id("bos_token")

    def encode(self, text: str, add_special_tokens: bool = True) -> np.ndarray:
        """Token ids of ``text`` as an int32 array (with the post-processor's special tokens, e.g. BOS, unless
        ``add_special_tokens=False``; a chat template's output already has them, so pass False there)."""
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids, np.int32)

    def decode(self, tokens, skip_special_tokens: bool = False) -> str:
        """Text of token ids (any int array)."""
        return self.tokenizer.decode(np.asarray(tokens).astype(np.int64).tolist(),
                                     skip_special_tokens=skip_special_tokens)

    # ---- chat -----------------------------------------------------------------------------------------
    @property
    def chat_template(self) -> str | None:
        return self.config.get("chat_template")

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text of ``messages`` (``[{"role": ..., "content": ...}, ...]``) under the checkpoint's chat
        template (``kwargs`` are further template variables); ValueError when it has none."""
        template = self.chat_template
        if template is None:
            raise ValueError(f"this tokenizer has no chat template ({TOKENIZER_CONFIG} has no 'chat_template')")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t["name"]: t["template"] for t in template}
            if "default" not in named:
                raise ValueError(f"chat templates {sorted(named)} have no 'default'")
            template = named["default"]
        return _render(template, list(messages), add_generation_prompt=add_generation_prompt,
                       **{k: v for k, v in self.special_tokens.items() if v is not None}, **kwargs)


def _render(template: str, messages: list, **variables) -> str:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template).render(messages=messages, **variables)
