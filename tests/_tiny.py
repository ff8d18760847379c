"""Tiny seeded models for pipeline and sampling tests (fast on 2 CPU cores)."""
import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel

from ledit_convert.models.dit import LEDiTTransformer2DModel

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


TEXT_WIDTH = 16  # the tiny T5's d_model: a tiny PixArt's caption_channels
WORDS = ("a red blue green fox cat dog in the snow sea at dusk lighthouse bowl of ramen top view portrait old "
         "sailor square circle small big on white black background").split()


def tiny_tokenizer():
    """A word-level fast tokenizer with T5's special tokens (pad 0, eos 1, unk 2) that appends </s>, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_t5(seed: int = 0, width: int = TEXT_WIDTH):
    """A two-layer T5 encoder with seeded weights."""
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(WORDS) + 3, d_model=width, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                      relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0,
                      eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def save_text_encoder(folder, seed: int = 0, width: int = TEXT_WIDTH):
    """text_encoder/ and tokenizer/ under `folder`, as a PixArt pipeline folder holds them."""
    tiny_t5(seed, width).save_pretrained(f"{folder}/text_encoder")
    tiny_tokenizer().save_pretrained(f"{folder}/tokenizer")
    return folder


def tiny_clip(seed: int, hidden: int, projection: int):
    """A two-layer CLIP text encoder with a projection (SD3's CLIP-L/G in miniature), seeded."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(WORDS) + 3, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=1, max_position_embeddings=16,
                            projection_dim=projection, pad_token_id=0, bos_token_id=0, eos_token_id=1)
    return CLIPTextModelWithProjection(config).eval()


def save_sd3_text_encoders(folder, seed: int = 0, joint_width: int = 12, t5: bool = True, clip_tokens: int = 6):
    """text_encoder/ + tokenizer/ (CLIP-L), text_encoder_2/ + tokenizer_2/ (CLIP-G) and text_encoder_3/ +
    tokenizer_3/ (T5) under `folder`, as an SD3 pipeline folder holds them: CLIP widths 4 + 4 (zero-padded to the
    T5's `joint_width`), pooled 4 + 6."""
    for i, (hidden, projection) in enumerate(((4, 4), (4, 6))):
        tiny_clip(seed + i, hidden, projection).save_pretrained(f"{folder}/text_encoder{'_2' if i else ''}")
        tok = tiny_tokenizer()
        tok.model_max_length = clip_tokens
        tok.save_pretrained(f"{folder}/tokenizer{'_2' if i else ''}")
    if t5:
        tiny_t5(seed + 2, joint_width).save_pretrained(f"{folder}/text_encoder_3")
        tiny_tokenizer().save_pretrained(f"{folder}/tokenizer_3")
    return folder
