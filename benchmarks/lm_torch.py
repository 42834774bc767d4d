"""The PyTorch twin of jaxlab's attention LM, for the side-by-side column of ``benchmarks/lm.py``.

    <torch venv>/bin/python benchmarks/lm_torch.py --d-model 128 --num-layers 4 --num-heads 4 \
        --batch 16 --seq-len 256 --steps 30 [--compile] [--weights W.npz]

A nanoGPT-style model with exactly the architecture of ``LM(LMConfig(mixer="attention", ffn="swiglu"))``:
token embedding (std 0.02) tied to the output head, pre-norm blocks of RMSNorm (fp32 statistics, eps
1e-6) -> q/k/v projections without bias -> rotary embedding on channel pairs ``(x_i, x_{i+D/2})`` ->
causal ``scaled_dot_product_attention`` -> output projection, then RMSNorm -> SwiGLU (d_ff = 8d/3 rounded
up to a multiple of 8) -> residual; final RMSNorm. Trained as ``jaxlab train lm`` trains it: mean
next-token cross-entropy, global-norm clipping at 1.0, AdamW (beta2 0.95, eps 1e-8, weight decay 0.1 on
matrices and the embedding, none on norm scales), linear warm-up then cosine decay.

It is run in its own virtual environment with the CPU build of torch (``pip install torch==2.13.0``; the
default resolution pulls a CUDA build), never as a jaxlab dependency, and it imports only torch and
numpy. ``--weights`` loads jaxlab's parameters (an ``.npz`` that ``benchmarks/lm.py`` writes, with a batch)
and prints the first step's loss and gradient norm, which must equal jaxlab's: the check that the twin is
the same model. Prints one JSON object: best and median step time and tokens/s after warm-up.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=30, help="timed steps (after --warmup untimed ones)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--attention", default=None, metavar="B,L,H,D",
                   help="time only causal scaled_dot_product_attention forward+backward at this shape")
    p.add_argument("--weights", default=None, help="npz of jaxlab parameters and a batch: print step-0 loss")
    return p.parse_args(argv)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps, self.scale = eps, nn.Parameter(torch.ones(d))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps) * self.scale).to(x.dtype)


def rope(x, cos, sin):
    """x [B, H, L, D]; rotate the pairs (x_i, x_{i+D/2}) by the angles whose cos/sin are [L, D/2]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Block(nn.Module):
    def __init__(self, d: int, heads: int, d_ff: int):
        super().__init__()
        self.heads = heads
        self.mixer_norm, self.ffn_norm = RMSNorm(d), RMSNorm(d)
        self.query, self.key, self.value, self.out = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(d, d_ff, bias=False), nn.Linear(d, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d, bias=False)

    def forward(self, x, cos, sin):
        B, L, d = x.shape
        h = self.mixer_norm(x)
        split = lambda t: t.view(B, L, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731 [B, H, L, D]
        q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, L, D]
        x = x + self.out(a.transpose(1, 2).reshape(B, L, d))
        y = self.ffn_norm(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


class TwinLM(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, max_len: int):
        super().__init__()
        d_ff = -(-(8 * d // 3) // 8) * 8
        self.embed = nn.Embedding(vocab, d)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(d, heads, d_ff) for _ in range(layers))
        self.final_norm = RMSNorm(d)
        D = d // heads
        inv_freq = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float32) / D)
        angles = torch.arange(max_len, dtype=torch.float32)[:, None] * inv_freq  # [L, D/2]
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, tokens):
        L = tokens.shape[1]
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, self.cos[:L], self.sin[:L])
        return self.final_norm(x) @ self.embed.weight.T  # [B, L, V], tied head


def load_jaxlab(model: TwinLM, arrays) -> None:
    """Copy jaxlab's parameters (flattened names ``block_0/mixer/query/kernel``...) into the twin."""
    def linear(mod, kernel):  # jaxlab kernel [in, *out] or [*in, out] -> torch weight [out, in]
        mod.weight.data = torch.from_numpy(np.ascontiguousarray(kernel.reshape(mod.weight.shape[1], -1).T))

    model.embed.weight.data = torch.from_numpy(arrays["embed/embedding"])
    model.final_norm.scale.data = torch.from_numpy(arrays["final_norm/scale"])
    for i, b in enumerate(model.blocks):
        p = f"block_{i}/"
        for name in ("query", "key", "value"):
            linear(getattr(b, name), arrays[p + f"mixer/{name}/kernel"])
        d = b.out.weight.shape[0]
        b.out.weight.data = torch.from_numpy(np.ascontiguousarray(arrays[p + "mixer/out/kernel"].reshape(-1, d).T))
        for name in ("gate", "up", "down"):
            linear(getattr(b, name), arrays[p + f"ffn/{name}/kernel"])
        b.mixer_norm.scale.data = torch.from_numpy(arrays[p + "mixer_norm/scale"])
        b.ffn_norm.scale.data = torch.from_numpy(arrays[p + "ffn_norm/scale"])


def make_optimizer(model, steps: int, lr: float = 3e-3, warmup: int = 100, min_ratio: float = 0.1):
    decay = [p for n, p in model.named_parameters() if not n.endswith("scale")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("scale")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def time_attention(shape: str, repeats: int = 5) -> dict:
    """Best time of causal SDPA forward+backward on [B, H, L, D] fp32 inputs."""
    B, L, H, D = map(int, shape.split(","))
    q, k, v = (torch.randn(B, H, L, D, requires_grad=True) for _ in range(3))
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
        best = min(best, time.perf_counter() - start)
    return {"shape": [B, L, H, D], "fwd_bwd_ms": 1e3 * best}


def main(argv=None):
    a = _args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.attention:
        print(json.dumps(time_attention(a.attention)))
        return
    torch.manual_seed(0)
    model = TwinLM(a.vocab_size, a.d_model, a.num_layers, a.num_heads, a.seq_len)
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "compile": a.compile}
    if a.weights:
        arrays = dict(np.load(a.weights))
        load_jaxlab(model, arrays)
        tokens = torch.from_numpy(arrays["batch/inputs"]).long()
        targets = torch.from_numpy(arrays["batch/targets"]).long()
        mask = torch.from_numpy(arrays["batch/mask"]).float()
        logits = model(tokens)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        loss = (nll * mask.reshape(-1)).sum() / mask.sum().clamp(min=1.0)
        loss.backward()
        grad_norm = torch.sqrt(sum(p.grad.double().square().sum() for p in model.parameters()))
        result.update(loss=loss.item(), grad_norm=grad_norm.item())
        model.zero_grad(set_to_none=True)
    opt, sched = make_optimizer(model, a.warmup + a.steps)
    fwd = torch.compile(model) if a.compile else model
    gen = np.random.default_rng(0)
    tokens = torch.from_numpy(gen.integers(1, a.vocab_size, (a.batch, a.seq_len + 1))).long()
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def step():
        logits = fwd(inputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        return loss.item()

    start = time.perf_counter()
    for _ in range(a.warmup):
        step()
    result["warmup_s"] = time.perf_counter() - start
    times = []
    for _ in range(a.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    tokens_per_step = a.batch * a.seq_len
    result.update(step_ms_best=1e3 * min(times), step_ms_median=1e3 * statistics.median(times),
                  tokens_per_s=tokens_per_step / statistics.median(times),
                  tokens_per_s_best=tokens_per_step / min(times))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
