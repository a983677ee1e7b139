"""A small decoder-only language model in the style of HuggingFace models.

A config object, keyword inputs (``attention_mask``), a shape-dependent branch (the causal mask is
only built for sequences longer than one token, a cache-less generation shortcut), and a dict
output. ``torch.fx.symbolic_trace`` cannot follow the branch; gradxform falls back to
``torch.export``.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class LMConfig:
    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    max_positions: int = 128
    tie_word_embeddings: bool = False


class SelfAttention(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        self.heads = config.num_heads
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x, mask):
        n, t, d = x.shape

        def heads(y):
            return y.view(n, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        scores = q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5
        if mask is not None:
            scores = scores + mask
        out = F.softmax(scores, dim=-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(n, t, d))


class DecoderLayer(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.hidden_size)
        self.mlp = nn.Sequential(nn.Linear(config.hidden_size, 4 * config.hidden_size), nn.GELU(),
                                 nn.Linear(4 * config.hidden_size, config.hidden_size))

    def forward(self, x, mask):
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class DecoderLM(nn.Module):
    def __init__(self, config: LMConfig | None = None):
        super().__init__()
        self.config = config = config or LMConfig()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_positions, config.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(config) for _ in range(config.num_layers)])
        self.ln_f = nn.LayerNorm(config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.wte.weight

    def forward(self, input_ids, attention_mask=None):
        n, t = input_ids.shape
        if t > self.config.max_positions:
            raise ValueError(f"sequence of {t} tokens is longer than max_positions")
        positions = torch.arange(t, device=input_ids.device)
        h = self.wte(input_ids) + self.wpe(positions)
        mask = None
        if t > 1:  # a single token attends only to itself: no mask needed
            mask = torch.full((t, t), float("-inf"), device=h.device).triu(1)
            if attention_mask is not None:
                mask = mask + (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * -1e9
        for layer in self.layers:
            h = layer(h, mask)
        return {"logits": self.lm_head(self.ln_f(h))}


def build_model():
    return DecoderLM()


def example_inputs(model=None):
    vocab = model.config.vocab_size if model is not None else 256
    gen = torch.Generator().manual_seed(0)
    return (torch.randint(0, vocab, (2, 16), generator=gen),), {"attention_mask": torch.ones(2, 16, dtype=torch.long)}
