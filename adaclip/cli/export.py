"""`adaclip export`: an adapter in another form (merged, open_clip, PEFT, ONNX)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import UsageError
from .base import command
from .options import SUMMARY_FORMATS, AdapterWeightsOpt, check_format, complete_from

EXPORT_FORMATS = ("adaclip", "open_clip", "peft", "onnx")  # adaclip.interop.EXPORT_FORMATS (imports torch)


@command()
def export(
    adapter_path: Path = typer.Argument(..., metavar="ADAPTER", help="An .adaclip file."),
    output: Path = typer.Option(
        ..., "--output", "-o", help="File to write (a folder for --format peft; ONNX also writes OUTPUT.json)."
    ),
    target: str = typer.Option(
        "adaclip",
        "--format",
        "-f",
        help="adaclip (with --merged), open_clip (state dict), peft (LoRA folder) or onnx (image classifier).",
        autocompletion=lambda incomplete: complete_from(list(EXPORT_FORMATS), incomplete),
    ),
    merged: bool = typer.Option(
        False, "--merged", help="--format adaclip: store per-layer matrices (AdaRing): predict skips reconstruction."
    ),
    pretrained: str | None = AdapterWeightsOpt,
    force: bool = typer.Option(False, "--force", help="Overwrite the output if it exists."),
    summary_fmt: str = typer.Option(
        "table",
        "--summary",
        help="How the summary is printed on stdout: table or json.",
        autocompletion=lambda incomplete: complete_from(list(SUMMARY_FORMATS), incomplete),
    ),
) -> None:
    """Write an adapter in another form: merged, or for open_clip, Hugging Face PEFT or ONNX Runtime.

    --format open_clip folds LoRA / full fine-tuning into the weights; load the file with
    open_clip.create_model_and_transforms(NAME, pretrained=FILE). --format peft writes LoRA as a PEFT
    adapter folder. --format onnx bakes the image tower, the method and its classes into one graph
    (pixels -> logits). With --merged, AdaRing's tensor rings are expanded into the per-layer matrices
    they encode, so loading and predicting pay no reconstruction cost.

    Examples:

        adaclip export pets.adaclip --merged -o pets.merged.adaclip

        adaclip export pets-lora.adaclip --format open_clip -o pets.safetensors

        adaclip export pets.adaclip --format onnx -o pets.onnx
    """
    from ..api import load
    from ..files import checked_output
    from ..views import write_summary

    if target not in EXPORT_FORMATS:
        raise UsageError(f"unknown --format {target!r}", fix=f"use one of: {', '.join(EXPORT_FORMATS)}")
    check_format(summary_fmt, SUMMARY_FORMATS)
    if target == "adaclip" and not merged:
        raise UsageError("nothing to do", fix="pass --merged, or --format open_clip, peft or onnx")
    if merged and target != "adaclip":
        raise UsageError("--merged applies to --format adaclip only")
    # PEFT writes a folder of its own layout; every other target is one file, checked and locked here.
    with checked_output(None if target == "peft" else output, force=force, inputs=[adapter_path]):
        adapter = load(adapter_path, pretrained=pretrained, device="cpu", precision="fp32")
        if target == "adaclip":
            path = adapter.merged().save(output, force=force)
            summary = {"format": "adaclip", "output": str(path), "merged": True, "output_bytes": path.stat().st_size}
        else:
            from .. import interop

            writer = {"open_clip": interop.export_open_clip, "peft": interop.export_peft, "onnx": interop.export_onnx}
            summary = writer[target](adapter, output, force=force)
    summary = {"input": str(adapter_path), "input_bytes": adapter_path.stat().st_size, **summary}
    write_summary(summary, summary_fmt, "adaclip export")
