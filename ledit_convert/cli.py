"""The `ledit-convert` command line: parses, prints, and maps LeditError to one-line messages."""
import functools
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import LeditError

app = typer.Typer(
    name="ledit-convert",
    help="Turn pretrained DiTs into LEDiT models that generate at resolutions they were never trained on.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    rich_markup_mode="rich",
)
console = Console()
err_console = Console(stderr=True)
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
            first = str(e).splitlines()[0] if str(e) else ""
            err_console.print(f"[bold red]error:[/] {type(e).__name__}: {first} (rerun with --debug for the traceback)",
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


@app.command(epilog="Example: ledit-convert surgery DiT-XL-2-256x256.pt -o ledit-xl-2-256")
@reported
def surgery(
    source: str = typer.Argument(..., help="DiT checkpoint: .pt/.safetensors file, diffusers folder, or hub id."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder to write the LEDiT model to."),
    causal_layers: str = typer.Option("alternate", help="alternate | all | none | comma list of block indices."),
    scan: str = typer.Option("mask_lower_right_corner", help="Causal scan: one_dimension, mask_lower_right, "
                             "unmask_neighborhood, mask_lower_right_corner."),
    locality: str = typer.Option("full", help="Locality conv: full | depthwise | none."),
    kernel_size: int = typer.Option(3, help="Locality conv kernel size (odd)."),
    dilation_prob: float = typer.Option(0.1, help="Probability of a dilated conv at a training step."),
    dilation_rates: str = typer.Option("2", help="Comma list of dilations drawn when dilating."),
    post_norm: bool = typer.Option(False, "--post-norm", help="LayerNorm after the conv (from-scratch refinement)."),
    attention_scaling: str = typer.Option("log", help="log | none: logit scaling at new resolutions."),
    weights: str = typer.Option("ema", help="For DiT train.py checkpoints: ema | model."),
    num_heads: Optional[int] = typer.Option(None, help="Attention heads, for non-standard widths."),
    image_size: Optional[int] = typer.Option(None, help="Training image size in pixels, when no pos_embed says it."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
):
    """Convert a stock DiT into an LEDiT: drop the positional encoding, add causal blocks and the locality conv."""
    from .surgery import SurgeryOptions, surgery_to_folder
    opts = SurgeryOptions(causal_layers=causal_layers, scan=scan, locality=locality, kernel_size=kernel_size,
                          dilation_prob=dilation_prob, dilation_rates=_int_list(dilation_rates, "--dilation-rates"),
                          post_norm=post_norm, attention_scaling=attention_scaling)
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


@app.command(epilog="Example: ledit-convert inspect ledit-xl-2-256")
@reported
def inspect(
    path: str = typer.Argument(..., help="A checkpoint file or model folder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    num_heads: Optional[int] = typer.Option(None, help="Attention heads, for non-standard widths."),
    image_size: Optional[int] = typer.Option(None, help="Training image size in pixels, when no pos_embed says it."),
):
    """Say what a file or folder is: format, variant, parameters, attention layout, provenance."""
    from .checkpoints import describe, read_checkpoint
    ckpt = read_checkpoint(path, num_heads=num_heads, image_size=image_size)
    summary = describe(ckpt)
    conv = ckpt.state_dict.get("locality_conv.conv.weight")
    if conv is not None:
        summary["locality_conv_zero"] = bool((conv == 0).all())
    prov = Path(ckpt.path) / "provenance.json"
    if prov.exists():
        record = json.loads(prov.read_text())
        summary["made_from"] = f"{record['source']['path']} (sha256 {str(record['source']['sha256'])[:12]}...)"
        summary["made_by"] = f"{record['tool']} {record['tool_version']} on {record['created']}"
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        _print_summary(str(path), summary)


def main():
    """Console-script entry point."""
    app(prog_name="ledit-convert")


if __name__ == "__main__":
    sys.exit(main())
