"""What the lite text tower costs with and without the tokenizer's padding columns.

lite's tokenizer pads every prompt to 64 tokens; the tower masks padding out of attention and pooling,
so `Backbone.encode_text` drops the columns that are padding in every row. Methods that train through
the text tower (LoRA, CoOp, AdaRing's text rings) pay one forward and backward of the class prompts per
step. This times that step both ways, on Fashion-MNIST's 10 class names, plus the embeddings' largest
difference.

    python -m benchmarks.text_padding --rounds 5 --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import time

from .common import DOCS, RESULTS, ROOT, markdown_table, replace_section, run_header, write_json

PROMPTS = {  # CLIP-LoRA's training prompt, and CoOp's 16 context placeholders before the class name
    "a photo of a {}.": "lora (first template)",
    "X X X X X X X X X X X X X X X X {}.": "coop (16 context tokens)",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import torch

    import adaclip
    from adaclip.backbone.encoder import without_padding_columns

    torch.set_num_threads(args.threads)
    backbone = adaclip.create_backbone("lite", None)
    names = list(json.loads((ROOT / "sample_data" / "classes.json").read_text()).values())
    tower = backbone.model
    for parameter in tower.text.parameters():
        parameter.requires_grad_(True)  # a stand-in for an adapter's gradient path through every layer
    rows = []
    for template, label in PROMPTS.items():
        tokens = backbone.tokenize([template.format(n) for n in names])
        cut = without_padding_columns(tokens, backbone.text_padding_id).shape[1]
        seconds = {}
        # open_clip's own call on all 64 columns, against adaclip's (which drops the padding columns)
        for name, encode in (("all", tower.encode_text), ("without padding", backbone.encode_text)):
            encode(tokens).sum().backward()  # warm-up
            start = time.perf_counter()
            for _ in range(args.rounds):
                encode(tokens).sum().backward()
            seconds[name] = (time.perf_counter() - start) / args.rounds
        with torch.no_grad():
            difference = (tower.encode_text(tokens) - backbone.encode_text(tokens)).abs().max().item()
        rows.append(
            {
                "prompts": label,
                "classes": len(names),
                "columns": f"{tokens.shape[1]} -> {cut}",
                "step_s_all_columns": round(seconds["all"], 4),
                "step_s_without_padding": round(seconds["without padding"], 4),
                "speedup": round(seconds["all"] / seconds["without padding"], 2),
                "max_abs_difference": f"{difference:.1e}",
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    report = {**run_header(), "settings": vars(args), "rows": rows}
    output = RESULTS / f"text-padding-{platform.node() or 'host'}.json"
    write_json(output, report)
    machine = report["machine"]
    text = "\n".join(
        [
            "### lite's text tower without the padding columns",
            "",
            f"`{report['command']}` ({report['date']}, {report['git_commit'][:12]}, {machine['cpu']}, "
            f"{args.threads} thread(s), load average {machine['load_average'][0]} when read). One forward "
            "and backward of the 10 class prompts through the whole text tower (every weight trainable, "
            "as a stand-in for an adapter's gradient path), seconds per step, mean of "
            f"{args.rounds}; `max abs difference` is between the embeddings of both ways.",
            "",
            markdown_table(
                rows,
                [
                    ("prompts", "prompts"),
                    ("columns", "columns"),
                    ("step_s_all_columns", "all columns s"),
                    ("step_s_without_padding", "without padding s"),
                    ("speedup", "speed-up"),
                    ("max_abs_difference", "max abs difference"),
                ],
            ),
        ]
    )
    replace_section(DOCS / "benchmarks.md", "text-padding", text)
    print(f"wrote {output} and docs/benchmarks.md")


if __name__ == "__main__":
    main()
