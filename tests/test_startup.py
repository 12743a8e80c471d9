"""Start-up: help, version, `methods` and `info FILE` answer without importing torch, torchvision or
open_clip (they cost seconds); shell completion offers method names and formats."""

from __future__ import annotations

import json

import pytest
import torch

from adaclip.adapter_file import AdapterMetadata, write_adapter_file
from adaclip.identity import BackboneIdentity, PreprocessConfig
from adaclip.method_catalog import builtin_methods
from adaclip.methods import method_registry

from . import cli_run

HEAVY = ("torch", "torchvision", "open_clip", "matplotlib")
# Runs the CLI in a fresh interpreter and reports which heavy top-level modules it imported.
DRIVER = """
import json, sys
from adaclip.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code or 0
else:
    code = 0
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))
print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
""".replace("HEAVY", repr(HEAVY))


def run_cli(*args: str, env: dict | None = None) -> tuple[dict, str]:
    result = cli_run.run_cli(*args, env=env, entry=["-c", DRIVER])
    report = json.loads(result.stderr.strip().splitlines()[-1])
    return report, result.stdout


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory):
    metadata = AdapterMetadata(
        created_at="2026-01-01T00:00:00Z",
        backbone=BackboneIdentity(name="tiny", pretrained="none", embed_dim=4, image_size=32),
        method="linear-probe",
        method_config={},
        class_names=["a", "b"],
        templates=["a photo of a {}."],
        preprocess=PreprocessConfig(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        seed=0,
        trainable_params=10,
    )
    path = tmp_path_factory.mktemp("startup") / "probe.adaclip"
    return write_adapter_file(path, {"head.weight": torch.ones(2, 4), "head.bias": torch.zeros(2)}, metadata)


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["fit", "--help"],
        ["predict", "--help"],
        ["eval", "--help"],
        ["export", "--help"],
        ["compare", "--help"],
        ["report", "--help"],
        ["version"],
        ["--version"],
        ["methods"],
        ["methods", "--format", "json"],
    ],
)
def test_light_commands_import_no_heavy_module(args):
    report, stdout = run_cli(*args)
    assert report == {"code": 0, "heavy": []}, (args, report)
    assert stdout.strip()


def test_info_of_a_file_imports_no_heavy_module(adapter_file):
    report, stdout = run_cli("info", str(adapter_file), "--format", "json")
    assert report == {"code": 0, "heavy": []}
    document = json.loads(stdout)
    assert document["method"] == "linear-probe" and document["tensors"]["head.weight"]["shape"] == [2, 4]


def test_the_check_detects_a_heavy_import():
    """The driver itself must see torch when a command does load it (else the tests above prove nothing)."""
    report, _ = run_cli("info", "--method", "zeroshot", "--backbone", "lite", "--format", "json")
    assert report["code"] == 0 and "torch" in report["heavy"]


def test_catalog_read_from_source_matches_the_registry():
    registry = method_registry()
    catalog = {m.name: m for m in builtin_methods()}
    assert set(catalog) == set(registry)
    for name, config_class in registry.items():
        assert catalog[name].summary == config_class.summary, name
        assert catalog[name].class_agnostic == config_class.class_agnostic, name


def complete(words: str) -> list[str]:
    """What bash completion offers for the last word of `words` (Typer's protocol, run for real)."""
    parts = words.split(" ")
    env = {"_ADACLIP_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(len(parts) - 1)}
    report, stdout = run_cli(env=env)
    assert report["heavy"] == []  # every TAB runs the program: it must stay light
    return stdout.split()


def test_shell_completion_offers_methods_formats_and_backbones():
    assert complete("adaclip fit ./pets --method ") == sorted(registry_names := list(method_registry()))
    assert len(registry_names) >= 9
    assert complete("adaclip fit ./pets -m ada") == ["adaring", "adaring+rada"]
    assert complete("adaclip predict a.adaclip x.jpg --format j") == ["json", "jsonl"]
    assert complete("adaclip fit ./pets --format ") == ["table", "json"]
    assert "lite" in complete("adaclip fit ./pets --backbone ") and "ViT-B-16" in complete("adaclip fit ./p -b ViT-B")
    assert complete("adaclip fit ./pets --backbone hf") == ["hf-hub:"]  # then the user types org/name
    assert "--install-completion" in run_cli("--help")[1]
