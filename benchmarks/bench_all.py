"""Every speed figure in one command: training step, sampling at 1x/2x/4x tokens, surgery; JSON + table.

    python benchmarks/bench_all.py                   # CPU: DiT-S/2 sizes
    python benchmarks/bench_all.py --device cuda     # GPU: DiT-XL/2, bf16
    python benchmarks/bench_all.py --tiny            # a small size that always finishes quickly

Runs benchmarks/bench_train.py, bench_sampling.py and bench_surgery.py as child processes (each in a
fresh process, so one's memory does not count against another), reads the JSON line each prints, and
writes them together to --out (default bench_all.json) with a summary table of the ratios.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(script: str, args: list) -> dict:
    """Run one benchmark script and return the JSON object on its last JSON line."""
    proc = subprocess.run([sys.executable, str(HERE / script), *map(str, args)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": "no JSON line"}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tiny", action="store_true", help="Small sizes (a fallback that always finishes).")
    parser.add_argument("--out", default="bench_all.json")
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    if args.tiny:
        train = ["--variant", "S", "--latent", "16", "--batch", "2", "--steps", "2", "--warmup", "1"]
        sampling = ["--hidden", "64", "--layers", "2", "--heads", "2", "--steps", "2", "--batch", "1", "--repeats", "1"]
        surgery = ["--variant", "S", "--repeats", "1"]
    elif gpu:
        train = ["--variant", "XL", "--batch", "32", "--dtype", "bf16", "--steps", "8", "--warmup", "3"]
        sampling = ["--hidden", "1152", "--layers", "28", "--heads", "16", "--batch", "8", "--dtype", "bf16"]
        surgery = ["--variant", "XL", "--repeats", "2"]
    else:
        train = ["--variant", "S", "--batch", "8", "--steps", "6", "--warmup", "2"]
        sampling = []
        surgery = ["--variant", "XL", "--repeats", "2"]
    results = {
        "train": run("bench_train.py", train + ["--device", args.device]),
        "sampling": run("bench_sampling.py", sampling + ["--device", args.device]),
        "surgery": run("bench_surgery.py", surgery),
    }
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"{'figure':48}{'value':>14}")
    for arm, row in results["train"].get("rows", {}).items():
        mfu = f", MFU {100 * row['mfu']:.1f}%" if row.get("mfu") else ""
        print(f"{'train step ' + arm + ' vs diffusers':48}{row['ratio_vs_diffusers']:13.3f}x  "
              f"({row['images_per_s']:.1f} img/s{mfu})")
    for row in results["sampling"].get("results", []):
        print(f"{'sampling ' + row['row']:48}{row['ratio_vs_diffusers']:13.3f}x")
    if "time_ratio" in results["surgery"]:
        print(f"{'surgery time vs load + save':48}{results['surgery']['time_ratio']:13.3f}x")
        print(f"{'surgery peak memory / checkpoint':48}{results['surgery']['surgery_peak_over_checkpoint']:13.3f}x")
    for name, res in results.items():
        if "error" in res:
            print(f"{name}: failed: {res['error']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
