"""Training throughput in aspect-ratio buckets against square crops of the same pixel count, measured in one run.

    python benchmarks/bench_buckets.py                          # CPU: a 4-layer LEDiT, batch 16, 256 tokens
    python benchmarks/bench_buckets.py --device cuda --batch 64 --hidden 1152 --layers 28

Two latent caches of the same images through the same VAE: square 128 px crops (the peer) and buckets of exactly
that area (128x128, 64x256, 256x64, so every batch has the same token count). Each is fine-tuned by `finetune`'s
own step loop (train_step + EMA), in a process of its own (one run's loader workers and state never share a
process with the other's); the two alternate for --rounds rounds so drift in the machine's load hits both.
Also the batch samplers' own cost per step (bucketed against plain), which is host work the GPU never waits on
when it is small. Prints one JSON line: images/s of each, their ratio, microseconds per step of each sampler.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffusers import AutoencoderKL  # noqa: E402

from ledit_convert.data.bucket_cache import BucketedLatents, cache_bucketed_latents  # noqa: E402
from ledit_convert.data.buckets import BucketBatchSampler, parse_buckets  # noqa: E402
from ledit_convert.data.images import ImageFolderDataset  # noqa: E402
from ledit_convert.data.latents import cache_latents  # noqa: E402
from ledit_convert.models.dit import LEDiTTransformer2DModel  # noqa: E402
from ledit_convert.training.runstate import ResumableSampler  # noqa: E402

SIDE = 128  # pixels; latents 32x32 through a 4x VAE, 16x16 tokens with patch 2
SHAPES = [(128, 128), (64, 256), (256, 64)]  # (height, width): every one 128^2 pixels


def write_images(root: Path, n: int, shapes) -> None:
    rng = np.random.default_rng(0)
    (root / "c").mkdir(parents=True)
    for i in range(n):
        h, w = shapes[i % len(shapes)]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "c" / f"{i}.png")


def tiny_vae() -> AutoencoderKL:
    blocks = (8, 8, 16)
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=blocks,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         layers_per_block=1, norm_num_groups=4, sample_size=SIDE)


def make_run(tmp: Path, cache: Path, name: str, args):
    from ledit_convert.training.finetune import setup
    from ledit_convert.training.recipe import load_recipe
    torch.manual_seed(0)
    LEDiTTransformer2DModel(sample_size=SIDE // 4, patch_size=2, in_channels=4, out_channels=8,
                            hidden_size=args.hidden, num_layers=args.layers, num_attention_heads=args.heads,
                            num_classes=1, attention_layout=["self", "causal"] * (args.layers // 2)
                            ).save_pretrained(tmp / f"model-{name}")
    recipe = load_recipe(None, dict(resolution=SIDE, vae="none", global_batch_size=args.batch, steps=10 ** 6,
                                    num_workers=1, trackers=[], validate_every=0, attention_backend="sdpa",
                                    bucket_short="pad", mixed_precision="bf16" if args.device == "cuda" else "no"))
    return setup(str(tmp / f"model-{name}"), str(cache), recipe, str(tmp / f"run-{name}"))


def timed_steps(run, data, steps: int, device: str) -> float:
    """Seconds for `steps` steps of finetune's loop (train_step + EMA)."""
    from ledit_convert.training.finetune import train_step
    from ledit_convert.training.runstate import update_ema
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(run, next(data))
        update_ema(run.ema_trainable, run.trainable, run.recipe.ema_decay)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def sampler_cost(bucket_of_item, groups, batch: int, steps: int) -> dict:
    """Microseconds per step of drawing batch keys, bucketed and plain."""
    out = {}
    for name, sampler in (("bucketed", BucketBatchSampler(bucket_of_item, groups, batch, seed=0, short="pad")),
                          ("plain", ResumableSampler(len(bucket_of_item), 0))):
        it = iter(sampler)
        t0 = time.perf_counter()
        for _ in range(steps if name == "bucketed" else steps * batch):
            next(it)
        out[name] = (time.perf_counter() - t0) / steps * 1e6
    return out


def time_one(args) -> None:
    """Child process: warm up, time --steps steps of one arm on its cache, print its images/s."""
    with tempfile.TemporaryDirectory() as tmp:
        run = make_run(Path(tmp), Path(args.cache), args.arm, args)
        data = iter(run.loader)
        timed_steps(run, data, args.warmup, args.device)  # the first step of each shape included
        seconds = timed_steps(run, data, args.steps, args.device)
    print(json.dumps({"images_per_s": args.steps * args.batch / seconds}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--steps", type=int, default=12, help="Timed steps per round.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # a child process: time this arm on --cache
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        return time_one(args)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_images(tmp / "square", args.images, [(SIDE, SIDE)])
        write_images(tmp / "mixed", args.images, SHAPES)
        vae = tiny_vae()
        cache_latents(ImageFolderDataset(tmp / "square", SIDE, random_flip=False), vae, tmp / "cache-square",
                      batch_size=16)
        groups = parse_buckets(",".join(f"{h}x{w}" for h, w in SHAPES), 8)  # {128: the three shapes}
        cache_bucketed_latents(ImageFolderDataset(tmp / "mixed", SIDE, random_flip=False), vae, tmp / "cache-buckets",
                               groups, 8, batch_size=16)
        rates = {"square": [], "buckets": []}
        passed = [f"--{k}={getattr(args, k)}" for k in ("device", "batch", "hidden", "layers", "heads", "steps",
                                                         "warmup")]
        for _ in range(args.rounds):  # alternating rounds: load drift hits both
            for name in rates:
                out = subprocess.run([sys.executable, __file__, f"--arm={name}", f"--cache={tmp / f'cache-{name}'}",
                                      *passed], capture_output=True, text=True, check=True)
                rates[name].append(json.loads(out.stdout.strip().splitlines()[-1])["images_per_s"])
        cache = BucketedLatents(tmp / "cache-buckets")
        cost = sampler_cost(cache.bucket_of_item, cache.group_of_bucket, args.batch, 20000)
    rate = {name: float(np.median(r)) for name, r in rates.items()}
    print(json.dumps({"device": args.device, "batch": args.batch, "tokens": (SIDE // 8) ** 2,
                      "square_images_per_s": rate["square"], "bucketed_images_per_s": rate["buckets"],
                      "ratio": rate["buckets"] / rate["square"], "rounds": rates, "sampler_us_per_step": cost,
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
