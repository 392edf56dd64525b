"""Pre-norm ViT block with the official parameter names (norm1, attn.qkv, attn.proj, norm2, mlp.fc1/fc2)."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.attention import attention
from ..ops.dropout import Dropout
from ..ops.linear import linear


def apply_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``; a plain ``nn.Linear`` without hooks goes through :func:`mage_fast.ops.linear.linear`
    (MKL's packed product at inference on a CPU, the same numbers). Any other layer (a quantized
    replacement, one with hooks) is called as it is."""
    if type(layer) is nn.Linear and not (layer._forward_hooks or layer._forward_pre_hooks):
        return linear(x, layer.weight, layer.bias)
    return layer(x)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = Dropout(proj_drop)

    def _qkv(self, x):
        B, N, C = x.shape
        qkv = apply_linear(self.qkv, x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)  # 3 x (B, H, N, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self._qkv(x)
        p = self.attn_drop.p if self.training else 0.0
        o = attention(q, k, v, dropout_p=p, scale=self.scale)  # (B, H, N, d)
        return self.proj_drop(apply_linear(self.proj, o.transpose(1, 2).reshape(B, N, C)))

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, N, N) softmax weights, as the official ``return_attention`` gives them."""
        q, k, _ = self._qkv(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            s = (q.float() @ k.float().transpose(-2, -1)) * self.scale
        return s.softmax(dim=-1)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = Dropout(drop)

    def forward(self, x):
        return self.drop(apply_linear(self.fc2, self.drop(self.act(apply_linear(self.fc1, x)))))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 drop: float = 0.0, attn_drop: float = 0.0, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> torch.Tensor:
        if return_attention:
            return self.attn.attention_weights(self.norm1(x))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))



def init_linear_and_layernorm(module: nn.Module, skip_prefix: str = "") -> None:
    """The ViT/MAE initialisation: xavier-uniform Linear weights, zero biases, unit LayerNorms;
    submodules whose name starts with ``skip_prefix`` (e.g. a frozen tokenizer) are left alone."""
    for name, m in module.named_modules():
        if skip_prefix and name.startswith(skip_prefix):
            continue
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
