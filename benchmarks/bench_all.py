"""Every speed figure in one command: training step, sampling at 1x/2x/4x tokens, surgery; JSON + markdown.

    python benchmarks/bench_all.py                             # CPU: DiT-S/2 sizes (surgery at XL)
    python benchmarks/bench_all.py --compile                   # adds compiled training and sampling rows
    python benchmarks/bench_all.py --device cuda --compile     # GPU: correctness check, then DiT-XL/2 in bf16
    python benchmarks/bench_all.py --tiny                      # a small size that always finishes quickly

Runs benchmarks/gpu_check.py (CUDA only: every attention path and the compiled blocks against the reference
math; nothing is timed if it fails), then bench_train.py, bench_sampling.py, the compiled training step, the
host-sync check of a fine-tune step (CUDA) and bench_surgery.py, each in a fresh child process with a time
limit. A figure that fails at the full size (out of memory, say) is retried at the tiny size, so the run
finishes with something measured, and says which size each came from; one that runs out of time is not.
Writes --out (JSON, rewritten after each figure) and --markdown (the table the README shows), and prints
the table. --budget bounds the whole run: figures that no longer fit are skipped and marked so.
"""
import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TINY = {
    "train": ["--variant", "S", "--latent", "16", "--batch", "2", "--steps", "2", "--warmup", "1"],
    "sampling": ["--hidden", "64", "--layers", "2", "--heads", "2", "--steps", "2", "--batch", "1", "--repeats", "1"],
    "surgery": ["--variant", "S", "--repeats", "1"],
}


def run(script: str, args: list, timeout: float) -> dict:
    """Run one benchmark script; the JSON object on its last JSON line, or {"error": ...}."""
    try:
        proc = subprocess.run([sys.executable, str(HERE / script), *map(str, args)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over the {timeout:.0f} s limit"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 and not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        return {"error": tail[-1] if tail else f"exit code {proc.returncode}"}
    result = json.loads(lines[-1]) if lines else {"error": "no JSON line"}
    if proc.returncode != 0:
        result["error"] = f"exit code {proc.returncode}"
    return result


def measured(script: str, full: list, common: list, limit, tiny: bool) -> dict:
    """A figure at the full size (`full` + `common` arguments), else at the tiny size (TINY + `common`); `size`
    records which. `limit()` gives the seconds the next child may take."""
    if not tiny:
        result = run(script, full + common, limit())
        if "error" not in result or result["error"].startswith("over the"):  # a timeout: tiny would eat the budget
            return {**result, "size": "full"}
        print(f"{script}: {result['error']}; retrying at the tiny size", flush=True)
    key = script.removeprefix("bench_").removesuffix(".py")
    return {**run(script, TINY[key] + common, limit()), "size": "tiny"}


def table(results: dict) -> list:
    """(figure, value, note) rows for the summary."""
    rows = []
    for name in ("train", "train_compiled"):
        res = results.get(name) or {}
        label = "compiled " if name.endswith("compiled") else ""
        for arm, row in res.get("rows", {}).items():
            mfu = f", MFU {100 * row['mfu']:.1f}%" if row.get("mfu") else ""
            rows.append((f"{label}train step, {arm} / diffusers DiT", f"{row['ratio_vs_diffusers']:.3f}x",
                         f"{1000 * row['step_s']:.1f} ms, {row['images_per_s']:.1f} img/s, "
                         f"peak {row['peak_mem_gib']:.2f} GiB{mfu}"))
    sampling = results.get("sampling") or {}
    for row in sampling.get("results", []):
        rows.append((f"sampling, {row['row']}", f"{row['ratio_vs_diffusers']:.3f}x",
                     f"{row['images_per_s']:.2f} img/s, {row['tokens']} tokens"))
    for key, value in sampling.get("ratios", {}).items():
        rows.append((f"sampling ratio {key}", f"{value:.3f}x", ""))
    surgery = results.get("surgery") or {}
    if "time_ratio" in surgery:
        rows.append(("surgery time / (torch.load + safetensors save)", f"{surgery['time_ratio']:.3f}x", ""))
        rows.append(("surgery peak RSS / checkpoint size", f"{surgery['surgery_peak_over_checkpoint']:.3f}x", ""))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="Also time compiled blocks (training and sampling).")
    parser.add_argument("--tiny", action="store_true", help="Small sizes only (a fallback that always finishes).")
    parser.add_argument("--batch", type=int, default=None, help="Training batch (default 32 on CUDA, 8 on CPU).")
    parser.add_argument("--timeout", type=float, default=900, help="Seconds allowed to each child benchmark.")
    parser.add_argument("--budget", type=float, default=None,
                        help="Seconds for the whole run: figures that no longer fit are skipped and say so.")
    parser.add_argument("--out", default="bench_all.json")
    parser.add_argument("--markdown", default=None, help="Also write the table as markdown here.")
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    started = time.time()
    results = {"machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine(),
                           "argv": sys.argv[1:]}}

    def limit() -> float:
        if args.budget is None:
            return args.timeout
        return max(0.0, min(args.timeout, started + args.budget - time.time()))

    def record(name: str, figure) -> None:
        """Measure one figure unless the budget is spent; the JSON is rewritten after each, so a killed run
        keeps what it finished."""
        results[name] = figure() if limit() >= 20 else {"error": "skipped: the --budget was spent", "size": None}
        Path(args.out).write_text(json.dumps(results, indent=2))

    if gpu:
        record("check", lambda: run("gpu_check.py", [], limit()))
        check = results["check"]
        if "error" in check or not check.get("ok"):
            sys.exit(f"GPU correctness check failed, nothing timed: {check.get('error') or check.get('checks')}")
        batch = args.batch or 32
        train = ["--variant", "XL", "--batch", batch, "--dtype", "bf16", "--steps", "8", "--warmup", "3"]
        sampling = ["--hidden", "1152", "--layers", "28", "--heads", "16", "--batch", "8", "--dtype", "bf16"]
    else:
        batch = args.batch or 8
        train = ["--variant", "S", "--batch", batch, "--steps", "6", "--warmup", "2"]
        sampling = []
    device = ["--device", args.device]
    record("train", lambda: measured("bench_train.py", train, device, limit, args.tiny))
    record("sampling", lambda: measured("bench_sampling.py", sampling, device + ["--compile"] * args.compile, limit,
                                        args.tiny))
    if args.compile:
        record("train_compiled", lambda: measured("bench_train.py", train, device + ["--compile"], limit, args.tiny))
    if gpu:
        record("host_sync", lambda: run("gpu_check.py", ["--sync-only"], limit()))
    record("surgery", lambda: measured("bench_surgery.py", ["--variant", "XL", "--repeats", "2"], [], limit,
                                       args.tiny))
    results["seconds"] = round(time.time() - started, 1)
    Path(args.out).write_text(json.dumps(results, indent=2))

    rows = table(results)
    where = results["sampling"].get("device_name") or args.device
    lines = [f"Measured by `python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}` on {where}, "
             f"torch {results['train'].get('torch', '?')}; sizes: "
             + ", ".join(f"{k} {results[k].get('size')}" for k in ("train", "sampling", "surgery")) + ".", "",
             "| figure | value | detail |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    if "check" in results:
        checks = results["check"].get("checks", {})
        worst = max((v for k, v in checks.items() if isinstance(v, float) and "bf16" not in k), default=0.0)
        sync = results.get("host_sync", {})
        found = sync.get("error") or sync.get("host_sync") or "none"
        lines += ["", f"GPU check passed (worst fp32 relative error {worst:.1e}); host-device syncs in a fine-tune "
                      f"step: {found}."]
    failed = [f"{name}: {res['error']}" for name, res in results.items() if isinstance(res, dict) and "error" in res]
    lines += [""] + [f"Failed: {f}" for f in failed] if failed else []
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out}" + (f" and {args.markdown}" if args.markdown else "") + f" in {results['seconds']} s")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
