"""A small text-and-object-conditioned diffusion model, in plain PyTorch.

- `TextEncoder`: the frozen open_clip text tower. It returns *token-level* features: the
  transformer's last hidden states after `ln_final`, before pooling and projection, for all
  `context_length` positions ([B, L, width]); padding positions are kept and not masked, as
  Stable Diffusion does with CLIP. A text tower without those modules (e.g. a Hugging Face one)
  falls back to the pooled `encode_text` feature as a one-token sequence. The empty string ""
  is the null text (training drops captions to "").
- `UNet`: ε-prediction UNet. Every attention level has self-attention, cross-attention to the
  text tokens and an *additional* cross-attention to the object embedding (projected to
  `object_tokens` tokens), as the paper adds object cross-attention layers to Imagen. The
  null object φ is the zero vector (general-domain samples are trained with it).
- `Diffusion`: the DDPM forward process (cosine or linear β schedule), the standard denoising
  loss ‖ε − ε_θ(x_t, t, text, o)‖², and DDIM sampling (eta=0 deterministic, eta=1 ≈ DDPM)
  with classifier-free guidance with separate text and object scales:

      ε = ε(∅,∅) + s_t·(ε(t,∅) − ε(∅,∅)) + s_o·(ε(t,o) − ε(t,∅))

  ∅ text = features of "", ∅ object = φ. s_t = s_o = 1 gives the plain conditional ε(t,o);
  s_o = 0 ignores the object; the three predictions run as one batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# -- text encoder -----------------------------------------------------------------------------


class TextEncoder(nn.Module):
    """Frozen open_clip text tower -> token features [B, L, width]."""

    def __init__(self, clip: nn.Module, tokenizer):
        super().__init__()
        text = getattr(clip, "text", None)
        tower = text if isinstance(text, nn.Module) else clip  # CustomTextCLIP keeps its tower in .text
        self.tokenizer = tokenizer
        parts = ("token_embedding", "positional_embedding", "transformer", "ln_final")
        self.token_level = all(getattr(tower, p, None) is not None for p in parts)
        if self.token_level:
            # Keep only the text modules: the image tower (most of a CLIP) can be freed.
            self.token_embedding = tower.token_embedding
            self.positional_embedding = tower.positional_embedding
            self.transformer = tower.transformer
            self.ln_final = tower.ln_final
            self.register_buffer("attn_mask", getattr(tower, "attn_mask", None), persistent=False)
            self.width = int(self.token_embedding.weight.shape[1])
        else:
            self.clip = clip
            self.width = int(clip.encode_text(tokenizer([""])).shape[-1])
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "TextEncoder":
        return super().train(False)  # frozen: always in eval mode

    @torch.no_grad()
    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        device = next(self.parameters()).device
        tokens = self.tokenizer(list(texts)).to(device)
        if not self.token_level:
            return self.clip.encode_text(tokens).float()[:, None, :]
        dtype = self.positional_embedding.dtype
        x = self.token_embedding(tokens).to(dtype) + self.positional_embedding
        x = self.transformer(x, attn_mask=self.attn_mask)
        return self.ln_final(x).float()


# -- UNet -------------------------------------------------------------------------------------


@dataclass
class UNetConfig:
    image_size: int = 64
    text_dim: int = 512  # width of the text encoder's token features
    object_dim: int = 512  # width of the object embedding (the CLIP image embedding)
    channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attention_levels: tuple[int, ...] = (1, 2)  # indices into channel_mults
    heads: int = 4
    object_tokens: int = 4
    context_dim: int = 128  # text and object tokens are projected to this width

    def validate(self) -> None:
        down = 2 ** (len(self.channel_mults) - 1)
        if self.image_size % down:
            raise ValueError(f"image_size {self.image_size} must be divisible by {down} (channel_mults {self.channel_mults})")
        if any(not 0 <= lvl < len(self.channel_mults) for lvl in self.attention_levels):
            raise ValueError(f"attention_levels {self.attention_levels} must index channel_mults {self.channel_mults}")
        for mult in self.channel_mults:
            if (self.channels * mult) % self.heads:
                raise ValueError(f"channels*mult ({self.channels * mult}) must be divisible by heads ({self.heads})")


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, tdim: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(tdim, cout)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head attention of x [B, N, C] over context [B, M, Cc] (self-attention if None)."""

    def __init__(self, dim: int, heads: int, context_dim: Optional[int] = None):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(context_dim or dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, n, c = x.shape
        k, v = self.kv(x if context is None else context).chunk(2, dim=-1)

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.reshape(b, -1, self.heads, c // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q(x)), split(k), split(v))
        return self.out(y.transpose(1, 2).reshape(b, n, c))


class AttentionBlock(nn.Module):
    """Self-attention, cross-attention to text, cross-attention to the object, feed-forward."""

    def __init__(self, channels: int, heads: int, context_dim: int):
        super().__init__()
        self.norm = _norm(channels)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.ln_self, self.attn_self = nn.LayerNorm(channels), Attention(channels, heads)
        self.ln_text, self.attn_text = nn.LayerNorm(channels), Attention(channels, heads, context_dim)
        self.ln_object, self.attn_object = nn.LayerNorm(channels), Attention(channels, heads, context_dim)
        self.ln_ff = nn.LayerNorm(channels)
        self.ff = nn.Sequential(nn.Linear(channels, 4 * channels), nn.GELU(), nn.Linear(4 * channels, channels))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, text: torch.Tensor, obj: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        z = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # [B, HW, C]
        z = z + self.attn_self(self.ln_self(z))
        z = z + self.attn_text(self.ln_text(z), text)
        z = z + self.attn_object(self.ln_object(z), obj)
        z = z + self.ff(self.ln_ff(z))
        return x + self.proj_out(z.transpose(1, 2).reshape(b, c, h, w))


class UNet(nn.Module):
    """ε_θ(x_t, t, text tokens, object embedding)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        config.validate()
        self.config = config
        ch, tdim, ctx = config.channels, 4 * config.channels, config.context_dim
        self.time_mlp = nn.Sequential(nn.Linear(ch, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.text_proj = nn.Sequential(nn.LayerNorm(config.text_dim), nn.Linear(config.text_dim, ctx))
        self.object_proj = nn.Linear(config.object_dim, config.object_tokens * ctx)
        self.object_norm = nn.LayerNorm(ctx)
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skips, cur = [ch], ch
        for level, mult in enumerate(config.channel_mults):
            for _ in range(config.num_res_blocks):
                self.down.append(self._stage(cur, ch * mult, level, tdim))
                cur = ch * mult
                skips.append(cur)
            if level < len(config.channel_mults) - 1:
                self.down.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                skips.append(cur)
        self.mid = nn.ModuleList([ResBlock(cur, cur, tdim), AttentionBlock(cur, config.heads, ctx), ResBlock(cur, cur, tdim)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mults))):
            for _ in range(config.num_res_blocks + 1):
                self.up.append(self._stage(cur + skips.pop(), ch * mult, level, tdim))
                cur = ch * mult
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cur, cur, 3, padding=1)))
        self.out = nn.Sequential(_norm(cur), nn.SiLU(), nn.Conv2d(cur, 3, 3, padding=1))

    def _stage(self, cin: int, cout: int, level: int, tdim: int) -> nn.ModuleList:
        blocks: list[nn.Module] = [ResBlock(cin, cout, tdim)]
        if level in self.config.attention_levels:
            blocks.append(AttentionBlock(cout, self.config.heads, self.config.context_dim))
        return nn.ModuleList(blocks)

    def _run(self, stage: nn.Module, h, temb, text, obj) -> torch.Tensor:
        if not isinstance(stage, nn.ModuleList):
            return stage(h)  # down- or up-sampling
        for block in stage:
            h = block(h, temb) if isinstance(block, ResBlock) else block(h, text, obj)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, obj: torch.Tensor) -> torch.Tensor:
        temb = self.time_mlp(timestep_embedding(t, self.config.channels))
        text = self.text_proj(text)
        obj = self.object_norm(self.object_proj(obj).reshape(obj.shape[0], self.config.object_tokens, -1))
        h = self.conv_in(x)
        hs = [h]
        for stage in self.down:
            h = self._run(stage, h, temb, text, obj)
            hs.append(h)
        h = self._run(self.mid, h, temb, text, obj)
        for stage in self.up:
            if isinstance(stage, nn.ModuleList):
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run(stage, h, temb, text, obj)
        return self.out(h)


# -- diffusion --------------------------------------------------------------------------------


def beta_schedule(kind: str, timesteps: int) -> torch.Tensor:
    """β_1..β_T: 'linear' (DDPM: 1e-4 to 0.02, scaled to T) or 'cosine' (Nichol & Dhariwal)."""
    if kind == "linear":
        scale = 1000.0 / timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
    if kind == "cosine":
        s = 0.008
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta schedule {kind!r}: use 'cosine' or 'linear'")


class Diffusion(nn.Module):
    """DDPM forward process, ε-prediction loss, and guided DDIM sampling."""

    def __init__(self, timesteps: int = 1000, schedule: str = "cosine"):
        super().__init__()
        self.timesteps = timesteps
        alphas_cumprod = torch.cumprod(1 - beta_schedule(schedule, timesteps), dim=0)
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod[t][:, None, None, None]
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def loss(self, model: UNet, x0, t, noise, text, obj) -> torch.Tensor:
        """‖ε − ε_θ(√ᾱ x0 + √(1−ᾱ) ε, t, text, o)‖², mean over everything."""
        return F.mse_loss(model(self.q_sample(x0, t, noise), t, text, obj).float(), noise)

    @torch.no_grad()
    def sample(
        self,
        model: UNet,
        text: torch.Tensor,
        null_text: torch.Tensor,
        obj: torch.Tensor,
        *,
        steps: int = 50,
        eta: float = 0.0,
        text_scale: float = 5.0,
        object_scale: float = 3.0,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Images [B, 3, S, S] in [-1, 1] for text tokens [B, L, W] and object embeddings [B, D]."""
        if not 1 <= steps <= self.timesteps:
            raise ValueError(f"steps must be in [1, {self.timesteps}], got {steps}")
        b, size = obj.shape[0], model.config.image_size
        device = obj.device
        null_obj = torch.zeros_like(obj)
        texts = torch.cat([null_text, text, text])
        objs = torch.cat([null_obj, null_obj, obj])
        x = torch.randn((b, 3, size, size), generator=generator).to(device)
        ts = torch.linspace(self.timesteps - 1, 0, steps).round().long().tolist()
        for i, t in enumerate(ts):
            a = self.alphas_cumprod[t]
            a_prev = self.alphas_cumprod[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, device=device)
            t_batch = torch.full((3 * b,), t, device=device, dtype=torch.long)
            e_uu, e_tu, e_to = model(torch.cat([x, x, x]), t_batch, texts, objs).float().chunk(3)
            eps = e_uu + text_scale * (e_tu - e_uu) + object_scale * (e_to - e_tu)
            x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()  # consistent with the clipped x0
            sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
            if eta > 0 and i + 1 < len(ts):
                x = x + sigma * torch.randn(x.shape, generator=generator).to(device)
        return x
