"""Units of the trainer's model: the sampler recovers the data with an exact ε (oracle), the
guidance formula picks the right predictions, the UNet keeps shapes, the LR schedule."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from prep.trainer.model import Diffusion, UNet, UNetConfig
from prep.trainer.train import TrainConfig, learning_rate


class Oracle(torch.nn.Module):
    """The exact ε for a data set of one image: `conditioned` when text and object are given,
    `unconditioned` otherwise (so guidance can be checked)."""

    def __init__(self, diffusion: Diffusion, conditioned: torch.Tensor, unconditioned: torch.Tensor):
        super().__init__()
        self.config = SimpleNamespace(image_size=conditioned.shape[-1])
        self.diffusion, self.conditioned, self.unconditioned = diffusion, conditioned, unconditioned

    def forward(self, x, t, text, obj):
        a = self.diffusion.alphas_cumprod[t][:, None, None, None]
        has_both = ((text.abs().sum((1, 2)) > 0) & (obj.abs().sum(1) > 0))[:, None, None, None]
        target = torch.where(has_both, self.conditioned, self.unconditioned)
        return (x - a.sqrt() * target) / (1 - a).sqrt()


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sampler_recovers_the_data_from_the_exact_noise(schedule, eta):
    diffusion = Diffusion(1000, schedule)
    a, b = torch.rand(1, 3, 8, 8) * 2 - 1, torch.rand(1, 3, 8, 8) * 2 - 1
    text, null_text, obj = torch.ones(2, 3, 4), torch.zeros(2, 3, 4), torch.ones(2, 5)
    kw = dict(steps=20, eta=eta, generator=torch.Generator().manual_seed(0))
    out = diffusion.sample(Oracle(diffusion, a, b), text, null_text, obj, text_scale=1.0, object_scale=1.0, **kw)
    assert torch.allclose(out, a.expand(2, -1, -1, -1), atol=1e-5)  # ε(t, o)
    out = diffusion.sample(Oracle(diffusion, a, b), text, null_text, obj, text_scale=1.0, object_scale=0.0, **kw)
    assert torch.allclose(out, b.expand(2, -1, -1, -1), atol=1e-5)  # ε(t, ∅): the object is ignored


def test_unet_shapes_and_conditioning():
    config = UNetConfig(image_size=16, text_dim=12, object_dim=6, channels=8, channel_mults=(1, 2), attention_levels=(1,), heads=2, context_dim=16)
    torch.manual_seed(0)
    model = UNet(config).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 999])
    text, obj = torch.randn(2, 5, 12), torch.randn(2, 6)
    out = model(x, t, text, obj)
    assert out.shape == x.shape
    assert not torch.allclose(out, model(x, t, text, torch.zeros_like(obj)))  # the object is attended to
    with pytest.raises(ValueError, match="divisible"):
        UNetConfig(image_size=15, channel_mults=(1, 2)).validate()


def test_learning_rate_warmup_then_cosine():
    c = TrainConfig(shards="unused", lr=1e-3, min_lr=1e-4, warmup=10, max_steps=110, decay_steps=110)
    assert learning_rate(0, c) == pytest.approx(1e-4)
    assert learning_rate(9, c) == pytest.approx(1e-3)
    assert learning_rate(60, c) == pytest.approx(5.5e-4)
    assert learning_rate(110, c) == pytest.approx(1e-4) == learning_rate(500, c)
