"""Hugging Face checkpoints in and out of jaxlab's :class:`~jaxlab.models.lm.LM`.

``load_pretrained(path, *, dtype=None, mesh=None) -> (LM, params, tokenizer)`` reads ``LlamaForCausalLM``
(Llama 2/3, ``rope_scaling`` "llama3"), ``Qwen2ForCausalLM``, ``MistralForCausalLM`` and ``GPT2LMHeadModel``
folders (``config.json`` + safetensors, single or sharded); ``save_pretrained(model, params, path, tokenizer)``
writes them back so ``transformers.AutoModelForCausalLM.from_pretrained`` loads them; :class:`HFTokenizer`
wraps ``tokenizer.json`` with the byte tokenizer's interface and renders chat templates.

* :mod:`.config_map`: ``config.json`` <-> ``LMConfig``;
* :mod:`.weights`: tensor names and layouts per architecture;
* :mod:`.safetensors_io`: lazy, tensor-by-tensor reading and sharded writing;
* :mod:`.tokenizer`: :class:`HFTokenizer`;
* :mod:`.pretrained`: the two entry points.
"""

from jaxlab.models.hub.config_map import ARCHITECTURES, hf_config, infer_architecture, lm_config
from jaxlab.models.hub.pretrained import load_pretrained, save_pretrained
from jaxlab.models.hub.tokenizer import HFTokenizer

__all__ = ["ARCHITECTURES", "HFTokenizer", "hf_config", "infer_architecture", "lm_config", "load_pretrained",
           "save_pretrained"]
