"""Timing several training-step "arms" of the same size against a peer (diffusers' model, the arm `diffusers`) in
one run: what bench_pixart_train.py and bench_sd3_train.py share.

A script builds each arm's step closure (its model, batch and loss); this module gives them the common flags
(--steps, --warmup, --device, --dtype, --threads, --compile, --grad-ckpt, --arms, --smoke, --out), the model's
optimizer and step, the timing (warm-up one arm at a time, then round-robin rounds in a rotating order, so no arm
always runs right after the same other one), and the report: one row per arm with its median step and ratio to
`diffusers`, a table, one JSON summary line and, with --out, the rows as JSONL.
"""
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ledit_convert.models.compiling import compile_blocks  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BASELINE = "diffusers"  # the arm every ratio is taken against


def ledit_changes(layers: int) -> dict:
    """What surgery changes in a config for the LEDiT arm: no positional encoding, alternating self/causal blocks,
    locality conv "full", attention scaling "log"."""
    return dict(position_encoding="none", attention_layout=["self" if i % 2 == 0 else "causal" for i in range(layers)],
                locality="full", attention_scaling="log")


def build_arm(arm: str, arms, diffusers_class, our_class, cfg: dict):
    """The model of arm `arm` of `arms` (diffusers' name, ours in stock mode, ours as an LEDiT): diffusers' class,
    ours from the same config, or ours with ledit_changes; the weights are the script's business."""
    peer, stock, ledit = arms
    if arm == peer:
        return diffusers_class(**cfg)
    if arm == stock:
        return our_class(**cfg)
    if arm == ledit:
        return our_class(**cfg, **ledit_changes(cfg["num_layers"]))
    raise ValueError(f"unknown arm {arm!r}; expected one of {arms}")


def add_run_args(p, arms):
    """The flags every such benchmark has, after its own size flags; `arms` is the default --arms."""
    p.add_argument("--steps", type=int, default=10, help="Timed steps per arm (round-robin rounds).")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads); default torch's")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every arm's blocks (ledit_convert.models.compiling).")
    p.add_argument("--compile-mode", default="default")
    p.add_argument("--grad-ckpt", action="store_true", help="Gradient checkpointing in every arm.")
    p.add_argument("--arms", default=",".join(arms))
    p.add_argument("--smoke", action="store_true",
                   help="Tiny defaults (SMOKE) that finish in seconds; flags given still win.")
    p.add_argument("--out", default=None, help="Also write one JSON row per arm here (JSONL, overwritten).")


def parse(p, argv, smoke: dict):
    """p.parse_args(argv), with `smoke` (the tiny size) as the defaults under --smoke: flags given still win."""
    if p.parse_known_args(argv)[0].smoke:
        p.set_defaults(**smoke)
    return p.parse_args(argv)


def setup(args):
    """Applies --threads (and TF32 matmuls on CUDA); returns the device and the autocast dtype."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device, dtype


def prepare(model, args, device):
    """The model on the device in training mode (gradient checkpointing with --grad-ckpt, blocks compiled with
    --compile) and its optimizer (AdamW, fused on CUDA)."""
    model = model.to(device).train()
    if args.grad_ckpt:
        model.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, fused=device.type == "cuda")
    if args.compile:
        compile_blocks(model, args.compile_mode)
    return model, opt


def autocast(device, dtype):
    """Autocast to `dtype` (off for fp32)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def training_step(model, opt, compute_loss):
    """A closure running one training step (compute_loss(), the forward and loss, then backward + optimizer step
    + zero_grad; it returns the loss) and the model's parameter count."""
    def step():
        loss = compute_loss()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step, sum(p.numel() for p in model.parameters())


def sync(device):
    """Waits for the device's queued work (CUDA); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_arms(arms, make_step, warmup: int, steps: int, device):
    """Per arm: every timed step (s), the parameter count and the first warm-up step's loss (None without a
    warm-up). make_step(arm) returns the arm's step closure and parameter count. Warm-up one arm at a time, then
    round-robin rounds in a rotating order, so load from elsewhere on the machine and cache effects hit every arm
    alike."""
    step, params, first_loss = {}, {}, {}
    for arm in arms:
        step[arm], params[arm] = make_step(arm)
        first_loss[arm] = None
        for i in range(warmup):
            loss = step[arm]()
            if i == 0:
                first_loss[arm] = float(loss)
                if not torch.isfinite(loss):
                    raise RuntimeError(f"{arm}: non-finite loss in the warm-up")
        sync(device)
    times = {arm: [] for arm in arms}
    for r in range(steps):
        for arm in arms[r % len(arms):] + arms[:r % len(arms)]:
            t0 = time.perf_counter()
            step[arm]()
            sync(device)
            times[arm].append(time.perf_counter() - t0)
    return times, params, first_loss


def machine_info(device) -> dict:
    """The device, its name, the CPU threads and the torch and Python versions."""
    return {"device": str(device), "device_name": torch.cuda.get_device_name() if device.type == "cuda"
            else (platform.processor() or platform.machine()), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def arm_rows(bench: str, args, timed, machine: dict, **size) -> list:
    """One row per arm: its median step (s) and every step, images/s, the ratio to `diffusers` (None where that
    arm is not run), parameters, first loss, batch, then `size` (the script's own fields), dtype and machine.
    `timed` is time_arms' result."""
    times, params, first_loss = timed
    base = statistics.median(times[BASELINE]) if BASELINE in times and times[BASELINE] else None
    rows = []
    for arm in times:
        median = statistics.median(times[arm]) if times[arm] else None
        rows.append({"bench": bench, "arm": arm, "step_s": median, "step_s_all": times[arm],
                     "images_per_s": args.batch / median if median else None,
                     "ratio_vs_diffusers": median / base if median and base else None, "params": params[arm],
                     "first_loss": first_loss[arm], "batch": args.batch, **size, "dtype": args.dtype, **machine})
    return rows


def report(bench: str, args, rows: list, machine: dict, description: str, started: float):
    """Writes the rows to --out (JSONL), prints a title (`description`, then dtype, device and threads), the table
    and the summary JSON line (`started`: the perf_counter the run began at)."""
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{description}, {args.dtype} on {machine['device_name']}, {machine['threads']} threads"
          + (", compiled" if args.compile else ""))
    print(f"{'arm':12}{'step ms':>10}{'min ms':>10}{'max ms':>10}{'img/s':>9}{'vs (a)':>9}")
    for r in rows:
        ratio = f"{r['ratio_vs_diffusers']:.3f}x" if r["ratio_vs_diffusers"] else "-"
        if r["step_s"] is None:
            print(f"{r['arm']:12}{'-':>10}")
            continue
        print(f"{r['arm']:12}{1000 * r['step_s']:10.1f}{1000 * min(r['step_s_all']):10.1f}"
              f"{1000 * max(r['step_s_all']):10.1f}{r['images_per_s']:9.2f}{ratio:>9}")
    print(json.dumps({"bench": bench, "config": vars(args), "machine": machine,
                      "seconds": round(time.perf_counter() - started, 1),
                      "rows": {r["arm"]: {k: r[k] for k in ("step_s", "images_per_s", "ratio_vs_diffusers", "params",
                                                          "first_loss")}
                               for r in rows}}))


def run(bench: str, args, cfg: dict, reference_class, make_step, description: str, **size) -> list:
    """The whole benchmark; returns the rows. Every arm starts from the weights of one `reference_class(**cfg)`
    (diffusers' model, built under seed 0); make_step(arm, args, cfg, reference_state, device, dtype) returns an
    arm's step closure and parameter count. `description` opens the title, `size` goes into every row."""
    device, dtype = setup(args)
    started = time.perf_counter()
    torch.manual_seed(0)
    reference_state = reference_class(**cfg).state_dict()
    timed = time_arms(args.arms.split(","), lambda arm: make_step(arm, args, cfg, reference_state, device, dtype),
                      args.warmup, args.steps, device)
    machine = machine_info(device)
    rows = arm_rows(bench, args, timed, machine, **size)
    report(bench, args, rows, machine, description, started)
    return rows
