"""Tiny seeded models for pipeline and sampling tests (fast on 2 CPU cores)."""
import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel

from ledit_convert.model import LEDiTTransformer2DModel

NUM_CLASSES = 10
SAMPLE_SIZE = 8  # latent side at the training resolution
VAE_BLOCKS = (8, 8, 16)  # three blocks: vae_scale_factor 4, distinct from patch size 2 on purpose


def randomize_(model: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    """Overwrite every parameter with seeded noise: DiT's adaLN-Zero init would make the output exactly zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * std)
    return model.eval()


def tiny_ledit(seed: int = 0, layers: int = 4, **overrides) -> LEDiTTransformer2DModel:
    """A 32-wide LEDiT (SA, CA, ...) with random non-zero weights, in eval mode."""
    config = dict(sample_size=SAMPLE_SIZE, patch_size=2, in_channels=4, out_channels=8, hidden_size=32,
                  num_layers=layers, num_attention_heads=2, num_classes=NUM_CLASSES,
                  attention_layout=["self", "causal"] * (layers // 2), locality="full")
    config.update(overrides)
    return randomize_(LEDiTTransformer2DModel(**config), seed)


def tiny_dit(seed: int = 0) -> DiTTransformer2DModel:
    """A diffusers DiT with 1000 classes (DiTPipeline hard-codes null class 1000) and random weights."""
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                  num_layers=2, sample_size=SAMPLE_SIZE, patch_size=2, num_embeds_ada_norm=1000)
    return randomize_(model, seed)


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """An SD-style AutoencoderKL with 4 latent channels and vae_scale_factor 4."""
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=VAE_BLOCKS,
                        down_block_types=("DownEncoderBlock2D",) * len(VAE_BLOCKS),
                        up_block_types=("UpDecoderBlock2D",) * len(VAE_BLOCKS), layers_per_block=1,
                        norm_num_groups=4, sample_size=32)
    return randomize_(vae, seed, std=0.2)
