"""Reproduce the measurements behind RAda's defaults (adaclip/methods/rada.py docstring).

Synthetic CLIP-scale features (D = 512, logit scale 100; 20 base + 20 new classes) train the mask head
with the shared optimiser and schedule, so the learning rate and alpha can be studied without encoders:

    python tools/rada_study.py features --scenario noise '{"lr": 2e-3, "alpha": 0.1}' '{"lr": 2e-3, "alpha": 0}'
    python tools/rada_study.py features --scenario nuisance '{"lr": 2e-3, "alpha": 0.1}'
    python tools/rada_study.py memory --budget 1024     # peak RSS, K = 1000, D = 512, B = 32, fwd + bwd

Scenarios: `noise` (4 shots; correlated class embeddings and isotropic noise: zero-shot is already about
as good as it gets, so any learned mask overfits) and `nuisance` (16 shots; 64 feature coordinates carry a
large share of the text norm and per-image noise: a class-agnostic mask that suppresses them helps).
Run from the repository root; each run prints base / new accuracy and their harmonic mean over 2 seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from adaclip.methods.base import TrainConfig  # noqa: E402
from adaclip.methods.rada import RationalMaskConfig, RationalMaskHead  # noqa: E402
from adaclip.training import make_optimizer, make_scheduler  # noqa: E402

SCENARIOS = {
    "noise": {"nuisance": 0.0, "noise": 3.5, "common": 2.5, "shots": 4},
    "nuisance": {"nuisance": 8.0, "noise": 2.5, "common": 0.0, "shots": 16},
}


def make_task(seed: int, nuisance: float, noise: float, common: float, shots: int, d=512, k=40, nd=64, test=30):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(k, d, generator=g)
    h[:, :nd] *= 2.5
    h = F.normalize(h, dim=-1)
    shared = F.normalize(torch.randn(d, generator=g), dim=0)
    h = F.normalize(shared * common + h, dim=-1)

    def images(classes, n):
        y = classes.repeat_interleave(n)
        x = h[y] + noise * torch.randn(len(y), d, generator=g) / math.sqrt(d)
        x[:, :nd] += nuisance * torch.randn(len(y), nd, generator=g) / math.sqrt(nd)
        return F.normalize(x, dim=-1), y

    base, new = torch.arange(k // 2), torch.arange(k // 2, k)
    return h, images(base, shots), images(base, test), images(new, test), base, new


def accuracy(head, h, features, labels, classes) -> float:
    head.eval()
    with torch.no_grad():
        logits = head(features, h[classes], 100.0).logits
    return (classes[logits.argmax(-1)] == labels).float().mean().item()


def train_once(scenario: dict, seed: int, lr: float, alpha: float, softmax="joint", epochs=10, batch=32):
    h, (xf, xy), (bf, by), (nf, ny), base, new = make_task(seed, **scenario)
    torch.manual_seed(seed)
    head = RationalMaskHead(512, RationalMaskConfig(alpha=alpha, softmax=softmax))
    cfg = TrainConfig(epochs=epochs, batch_size=batch, lr=lr, weight_decay=5e-4, warmup_epochs=1)
    optimizer = make_optimizer(list(head.parameters()), cfg)
    steps = math.ceil(len(xy) / batch)
    scheduler = make_scheduler(optimizer, cfg, steps, steps * epochs)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        head.train()
        permutation = torch.randperm(len(xy), generator=order)
        for i in range(0, len(xy), batch):
            index = permutation[i : i + batch]
            out = head(xf[index], h[base], 100.0)
            loss = F.cross_entropy(out.logits, xy[index]) + sum(out.loss_terms.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    return accuracy(head, h, bf, by, base), accuracy(head, h, nf, ny, new)


def features_study(args) -> None:
    scenario = SCENARIOS[args.scenario]
    h, _, (bf, by), (nf, ny), base, new = make_task(0, **scenario)
    identity = RationalMaskHead(512)
    print(f"zero-shot base {accuracy(identity, h, bf, by, base):.3f} new {accuracy(identity, h, nf, ny, new):.3f}")
    for spec in args.runs:
        settings = json.loads(spec)
        results = [train_once(scenario, seed, **settings) for seed in (0, 1)]
        b = sum(r[0] for r in results) / len(results)
        n = sum(r[1] for r in results) / len(results)
        print(f"{settings}: base {b:.3f} new {n:.3f} hm {2 * b * n / (b + n):.3f}", flush=True)


def memory_study(args) -> None:
    k, d, b = 1000, 512, 32
    head = RationalMaskHead(d, RationalMaskConfig(memory_budget_mb=args.budget, chunk_size=args.chunk)).train()
    torch.manual_seed(0)
    f = F.normalize(torch.randn(b, d), dim=-1)
    h = F.normalize(torch.randn(k, d), dim=-1)
    y = torch.randint(0, k, (b,))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    out = head(f, h, 100.0)
    (F.cross_entropy(out.logits, y) + sum(out.loss_terms.values())).backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"K={k} D={d} B={b}: chunks of {head.chunk_images(k)} images; peak RSS {peak:.0f} MB "
        f"(before the forward pass {before:.0f} MB); forward + backward {seconds:.1f}s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="study", required=True)
    feats = sub.add_parser("features")
    feats.add_argument("--scenario", choices=sorted(SCENARIOS), required=True)
    feats.add_argument("runs", nargs="+", help='JSON settings per run, e.g. \'{"lr": 2e-3, "alpha": 0.1}\'')
    memory = sub.add_parser("memory")
    memory.add_argument("--budget", type=float, default=1024.0)
    memory.add_argument("--chunk", type=int, default=None, help="images per chunk (overrides --budget)")
    memory.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(getattr(args, "threads", 1))
    features_study(args) if args.study == "features" else memory_study(args)


if __name__ == "__main__":
    main()
