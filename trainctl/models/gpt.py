"""A small decoder-only transformer (pre-norm, causal self-attention through SDPA), with optional
stochastic depth on its residual branches."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainctl.models import drop_path, drop_path_rates, dropout


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout_p: float, bias: bool) -> None:
        super().__init__()
        self.n_head = n_head
        self.dropout_p = dropout_p
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.resid_dropout = dropout(dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_head, width // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout_p if self.training else 0.0)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(batch, length, width)))


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout_p: float, bias: bool, drop_path_p: float = 0.0) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model, bias=bias)
        self.attn = CausalSelfAttention(d_model, n_head, dropout_p, bias)
        self.ln2 = nn.LayerNorm(d_model, bias=bias)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model, bias=bias), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model, bias=bias), dropout(dropout_p))
        self.drop_path = drop_path(drop_path_p)  # one module, a fresh mask for each branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.ln1(x)))
        return x + self.drop_path(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    """Token + learned position embeddings, ``n_layer`` blocks, final norm, a (tied) vocabulary head.
    ``drop_path_rate`` is the stochastic-depth rate of the last block; block l of L (from 0) gets
    ``drop_path_rate * l / (L-1)``."""

    def __init__(self, vocab_size: int, max_seq_len: int, n_layer: int = 4, n_head: int = 4, d_model: int = 128,
                 dropout_p: float = 0.0, bias: bool = True, tie_weights: bool = True,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        self.tok_embed = nn.Embedding(vocab_size, d_model)
        self.pos_embed = nn.Embedding(max_seq_len, d_model)
        self.embed_dropout = dropout(dropout_p)
        self.blocks = nn.ModuleList(Block(d_model, n_head, dropout_p, bias, rate)
                                    for rate in drop_path_rates(drop_path_rate, n_layer))
        self.ln_f = nn.LayerNorm(d_model, bias=bias)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                # GPT-2's scaled init of the residual projections keeps the residual stream's variance flat.
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))
        if tie_weights:
            self.head.weight = self.tok_embed.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        length = idx.shape[1]
        positions = torch.arange(length, device=idx.device)
        x = self.embed_dropout(self.tok_embed(idx) + self.pos_embed(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))
