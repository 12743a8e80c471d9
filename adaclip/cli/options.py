"""Options that several commands share, declared once, and the parsers of option values.

An option group is a dataclass whose fields are options (`LoadOptions`: how to load an adapter;
`BackboneOptions`: which backbone to train on). A command names a group as one parameter,
`loading: LoadOptions = GROUP`; `command` (adaclip.cli.base) shows the group's options in that place
and hands the command one object holding their values. Adding a field to a group adds the option to
every command that names it. Options used alone are module constants (`DeviceOpt`), and `format_option`
makes a command's --format.

Standard library and typer only: `adaclip --help` must not import torch.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path
from typing import Any, ClassVar

import typer

from ..defaults import DEFAULT_BACKBONE, DEFAULT_PRETRAINED
from ..errors import UsageError
from ..output import FORMATS

# Shell completion (`adaclip --install-completion`) runs the program on every TAB: these read names
# without importing torch (method names from source, backbone names from open_clip's config files).


def complete_from(names: list[str], incomplete: str) -> list[str]:
    return [name for name in names if name.startswith(incomplete)]


def complete_method(incomplete: str) -> list[str]:
    from ..method_catalog import builtin_method_names

    return complete_from(builtin_method_names(), incomplete)


def complete_backbone(incomplete: str) -> list[str]:
    import importlib.util

    names = ["lite", "hf-hub:"]  # hf-hub:ORG/NAME, an open_clip model repo on the Hugging Face Hub
    spec = importlib.util.find_spec("open_clip")
    for location in (spec.submodule_search_locations or []) if spec else []:
        names += sorted(p.stem for p in (Path(location) / "model_configs").glob("*.json"))
    return complete_from(names, incomplete)


# ------------------------------------------------------------------------------ --format


def format_option(default: str, allowed: tuple[str, ...] = FORMATS) -> Any:
    """A command's --format: the formats it can write on stdout (check the value with `check_format`)."""
    return typer.Option(
        default,
        "--format",
        "-f",
        help=f"Output format on stdout: {', '.join(allowed)}.",
        autocompletion=lambda incomplete: complete_from(list(allowed), incomplete),
    )


def check_format(fmt: str, allowed: tuple[str, ...] = FORMATS) -> str:
    if fmt not in allowed:
        raise UsageError(f"unknown --format {fmt!r}", fix=f"use one of: {', '.join(allowed)}")
    return fmt


SUMMARY_FORMATS = ("table", "json")  # commands whose result is one summary
EVAL_FORMATS = ("table", "json", "csv")  # commands whose result is one row (or a leaderboard)

# ------------------------------------------------------------------------------ options used alone

BackboneOpt = typer.Option(
    None,
    "--backbone",
    "-b",
    help=(f"open_clip model name, hf-hub:org/name, or `lite` (embedded, offline). Default {DEFAULT_BACKBONE}."),
    autocompletion=complete_backbone,
)
PretrainedOpt = typer.Option(
    None,
    "--pretrained",
    "-p",
    help="open_clip pretrained tag, a local checkpoint file, or `none` (random weights); a revision for hf-hub:.",
)
# the training commands' (fit, compare) class-name and prompt options
ClassNamesOpt = typer.Option(
    None, "--classes", help="Class display names: one per line, JSON list, or JSON {folder: name}."
)
TemplatesOpt = typer.Option(
    "default", "--templates", help="Prompt templates: default, ensemble, or a file (one per line, with {})."
)
DeviceOpt = typer.Option("auto", "--device", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps.")
PrecisionOpt = typer.Option("auto", "--precision", help="auto (bf16 autocast on cuda, else fp32), fp32, bf16, fp16.")
CacheDirOpt = typer.Option(None, "--cache-dir", help="Where pretrained weights are cached / looked up.")
FeatureCacheOpt = typer.Option(
    None,
    "--feature-cache",
    metavar="DIR|off",
    help="Frozen image features kept for later runs: this folder, or off. Default $ADACLIP_CACHE, else the "
    "user cache folder (not --cache-dir, which holds weights).",
)
BatchOpt = typer.Option(64, "--batch-size", help="Images per forward pass.")
WorkersOpt = typer.Option(None, "--workers", help="Image decoding processes.")
AdapterWeightsOpt = typer.Option(
    None, "--pretrained", "-p", help="Where the adapter's backbone weights are, if not the recorded tag."
)
EvalClassesOpt = typer.Option(None, "--classes", help="Class display names for the folder's classes.")
TopKOpt = typer.Option(5, "--top-k", "-k", help="How many labels to report per image.")
# In help text, `\\<` keeps a literal <name>: the help is markdown, which would drop it as an HTML tag.
ImageFolderArg = typer.Argument(
    ...,
    help=(
        "Labelled images: a folder root/\\<class>/\\<image> (or root/{train,val,test}/\\<class>/\\<image>), "
        "a CSV/JSONL manifest, a folder with metadata.csv, or WebDataset shards (shards-{000000..000009}.tar)."
    ),
)


# ------------------------------------------------------------------------------ option groups


class OptionGroup:
    """Base of option groups: a dataclass whose fields are declared with `option(...)`."""

    @classmethod
    def parameters(cls) -> list[inspect.Parameter]:
        """The group's options as the parameters typer reads from a command's signature."""
        hints = {f.name: f.metadata["annotation"] for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return [
            inspect.Parameter(
                name,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                default=f.metadata["option"],
                annotation=hints[name],
            )
            for name, f in ((f.name, f) for f in dataclasses.fields(cls))  # type: ignore[arg-type]
        ]

    @classmethod
    def take(cls, values: dict[str, Any]) -> OptionGroup:
        """The group's values, removed from a command's parsed options."""
        return cls(**{f.name: values.pop(f.name) for f in dataclasses.fields(cls)})  # type: ignore[arg-type]


GROUP: Any = None  # the default of a parameter that stands for an option group (typer never sees it)


def option(annotation: Any, info: Any) -> Any:
    """A field of an option group: its type (for typer) and its typer.Option."""
    return dataclasses.field(default=info.default, metadata={"annotation": annotation, "option": info})


@dataclasses.dataclass(frozen=True)
class LoadOptions(OptionGroup):
    """How to load an adapter (predict, eval, tta, report): the keyword arguments of `load`."""

    pretrained: str | None = option(str | None, AdapterWeightsOpt)
    device: str = option(str, DeviceOpt)
    precision: str = option(str, PrecisionOpt)
    cache_dir: str | None = option(str | None, CacheDirOpt)

    def as_kwargs(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class BackboneOptions(OptionGroup):
    """Which backbone the training commands (fit, compare) train on."""

    backbone: str | None = option(str | None, BackboneOpt)
    pretrained: str | None = option(str | None, PretrainedOpt)
    LITE: ClassVar[str] = "lite"  # adaclip.backbone.LITE_NAME (that module imports torch)

    @property
    def name(self) -> str:
        return self.backbone or DEFAULT_BACKBONE

    def as_kwargs(self) -> dict[str, str | None]:
        """The default backbone with its default weights unless told otherwise (lite has no tag)."""
        pretrained = self.pretrained
        if pretrained is None:
            pretrained = None if self.backbone == self.LITE else DEFAULT_PRETRAINED
        return {"backbone": self.name, "pretrained": pretrained}


@dataclasses.dataclass(frozen=True)
class FeatureCacheOptions(OptionGroup):
    """Where the commands that encode through a frozen image tower (fit, compare, eval) keep features."""

    feature_cache: str | None = option(str | None, FeatureCacheOpt)

    def using(self):
        """Within the block, encodings use this cache (adaclip.feature_store)."""
        from ..feature_store import using

        return using(self.feature_cache)


@dataclasses.dataclass(frozen=True)
class DataOptions(OptionGroup):
    """How to read DATA that is a manifest or WebDataset shards (every command that reads labelled or
    listed images); class folders ignore them. `source(DATA)` is what the API takes."""

    path_column: str | None = option(
        str | None,
        typer.Option(
            None,
            "--path-column",
            help="Manifest column holding image paths (default: path; file_name in metadata.csv).",
        ),
    )
    label_column: str | None = option(
        str | None,
        typer.Option(
            None, "--label-column", help="Manifest column, or WebDataset .json field, holding labels (default: label)."
        ),
    )
    allow_absolute: bool = option(
        bool,
        typer.Option(
            False,
            "--allow-absolute",
            help="Read manifest paths that are absolute or climb out of its folder (../); for manifests you trust.",
        ),
    )

    def source(self, data: Any) -> Any:
        """DATA with these options, as adaclip.data.open_data gives it (a path-like DataSource)."""
        from ..data import open_data

        return open_data(
            data, path_column=self.path_column, label_column=self.label_column, allow_absolute=self.allow_absolute
        )


def group_parameters(function) -> tuple[inspect.Signature, dict[str, type[OptionGroup]]]:
    """`function`'s signature with each option-group parameter replaced, in place, by the group's
    options; and which parameters were groups."""
    signature = inspect.signature(function, eval_str=True)
    groups: dict[str, type[OptionGroup]] = {}
    parameters: list[inspect.Parameter] = []
    for parameter in signature.parameters.values():
        kind = parameter.annotation
        if isinstance(kind, type) and issubclass(kind, OptionGroup):
            groups[parameter.name] = kind
            parameters += kind.parameters()
        else:
            parameters.append(parameter)
    return signature.replace(parameters=parameters), groups


# ------------------------------------------------------------------------------ option values


def parse_settings(items: list[str]) -> dict[str, Any]:
    """`--set key=value` items -> nested dict; values are JSON when they parse (numbers, lists, true)."""
    settings: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--set expects key=value, got {item!r}", fix="e.g. --set ranks=[2,4] --set train.lr=1e-3")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = settings
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UsageError(f"--set {key}: {part} is not a group of settings")
        node[parts[-1]] = value
    return settings


def read_config_file(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError("config file not found", path=path) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"config file is not readable JSON ({exc})", path=path) from None
    if not isinstance(document, dict):
        raise UsageError("config file must hold a JSON object of method settings", path=path)
    return document


def parse_val_split(value: str) -> float | str:
    if value == "auto":
        return "auto"
    try:
        return float(value)
    except ValueError:
        raise UsageError(f"--val-split must be 'auto' or a fraction, got {value!r}") from None


def check_top_k(top_k: int) -> int:
    if top_k < 1:
        raise UsageError("--top-k must be at least 1")
    return top_k
