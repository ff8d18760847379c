"""Tiny seeded DiT checkpoints in each supported format, built without any download."""
import argparse

import torch

from reference import sincos_table_np

CFG_TINY = dict(hidden_size=64, num_layers=4, num_attention_heads=4, patch_size=2, in_channels=4,
            num_classes=10, sample_size=8, mlp_ratio=4.0)


def facebook_state_dict(seed=0, hidden=64, depth=4, patch=2, in_ch=4, classes=10, grid=4, learn_sigma=True,
                        mlp_ratio=4.0, std=0.1):
    """A random DiT state dict in facebookresearch's key names, every tensor non-zero."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * std

    out_ch = in_ch * 2 if learn_sigma else in_ch
    mlp = int(hidden * mlp_ratio)
    sd = {
        "x_embedder.proj.weight": rnd(hidden, in_ch, patch, patch), "x_embedder.proj.bias": rnd(hidden),
        "t_embedder.mlp.0.weight": rnd(hidden, 256), "t_embedder.mlp.0.bias": rnd(hidden),
        "t_embedder.mlp.2.weight": rnd(hidden, hidden), "t_embedder.mlp.2.bias": rnd(hidden),
        "y_embedder.embedding_table.weight": rnd(classes + 1, hidden),
        "pos_embed": torch.from_numpy(sincos_table_np(hidden, grid, grid)).float()[None],
        "final_layer.adaLN_modulation.1.weight": rnd(2 * hidden, hidden),
        "final_layer.adaLN_modulation.1.bias": rnd(2 * hidden),
        "final_layer.linear.weight": rnd(patch * patch * out_ch, hidden),
        "final_layer.linear.bias": rnd(patch * patch * out_ch),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({
            b + "attn.qkv.weight": rnd(3 * hidden, hidden), b + "attn.qkv.bias": rnd(3 * hidden),
            b + "attn.proj.weight": rnd(hidden, hidden), b + "attn.proj.bias": rnd(hidden),
            b + "mlp.fc1.weight": rnd(mlp, hidden), b + "mlp.fc1.bias": rnd(mlp),
            b + "mlp.fc2.weight": rnd(hidden, mlp), b + "mlp.fc2.bias": rnd(hidden),
            b + "adaLN_modulation.1.weight": rnd(6 * hidden, hidden), b + "adaLN_modulation.1.bias": rnd(6 * hidden),
        })
    return sd


def facebook_train_checkpoint(seed=0, **kw):
    """DiT train.py's checkpoint dict: model, ema, opt and an argparse.Namespace."""
    ema = facebook_state_dict(seed=seed, **kw)
    model = {k: v + 0.01 for k, v in ema.items()}
    model["pos_embed"] = ema["pos_embed"].clone()
    args = argparse.Namespace(model="DiT-XL/2", image_size=32, num_classes=10, global_batch_size=256)
    return {"model": model, "ema": ema, "opt": {"state": {}, "param_groups": []}, "args": args}


def diffusers_dit(seed=0, hidden=64, depth=4, heads=4, patch=2, in_ch=4, classes=10, sample_size=8, std=0.1):
    """A diffusers DiTTransformer2DModel with random non-zero weights."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=in_ch, out_channels=2 * in_ch,
        num_layers=depth, sample_size=sample_size, patch_size=patch, num_embeds_ada_norm=classes,
    )
    g = torch.Generator().manual_seed(seed)
    shared = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            key = name.split("norm1.emb.", 1)[-1] if "norm1.emb." in name else None
            if key is not None and key in shared:  # keep the per-block embedder copies identical, as shipped
                p.copy_(shared[key])
                continue
            p.copy_(torch.randn(p.shape, generator=g) * std)
            if key is not None:
                shared[key] = p.detach().clone()
    return model.eval()


def random_ledit_conv(model, seed=0, std=0.05):
    """Give a model's locality conv random non-zero weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.locality_conv.conv.weight.copy_(torch.randn(model.locality_conv.conv.weight.shape, generator=g) * std)
        model.locality_conv.conv.bias.copy_(torch.randn(model.locality_conv.conv.bias.shape, generator=g) * std)
    return model


def inputs(batch=2, channels=4, height=8, width=8, classes=10, seed=1):
    """Latents, timesteps and labels (one label is the null class)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, height, width, generator=g)
    t = torch.tensor([17, 930][:batch] + [500] * max(0, batch - 2))
    y = torch.tensor([3, classes][:batch] + [1] * max(0, batch - 2))
    return x, t, y


def rel_err(a, b):
    """Relative error of `a` against the reference `b`, in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
