"""Load test of `adaclip serve` on the offline `lite` backbone, localhost only (`make bench-serve`).

Fits three frozen-tower adapters (zeroshot, linear-probe, tip-adapter) on sample_data/, then:

1. `Adapter.predict` on sample_data/test (200 images): the images/s to compare with, measured before
   and after the server runs (the machine is shared, so both are kept).
2. `adaclip serve` in a subprocess on 127.0.0.1 (ephemeral port); N concurrent httpx clients send one
   image per request (raw image/png body) for a fixed number of requests: images/s, p50/p99 latency and
   every status, for N = 1, 16 and 64, and for `adapter=all` (three adapters from one encoding).
3. Past the sustainable rate: a second server with a small queue (--queue-size 16) and 128 clients:
   every answer must be 200 or a 503 carrying Retry-After, with no connection error.
4. Memory: 10,000 requests in a row, the server's RSS sampled every half second.

Every request loop is bounded in count and in time (--max-seconds per phase) and stops by itself;
nothing is sent anywhere but 127.0.0.1. Writes results/serve-<host>.json and the serve table in
docs/benchmarks.md.

    python -m benchmarks.serve                       # the committed run (about 15 minutes on 2 cores)
    python -m benchmarks.serve --quick               # a smoke run in about a minute
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from .common import DOCS, RESULTS, ROOT, markdown_table, replace_section, run_header, write_json

SAMPLE = ROOT / "sample_data"
HOST = "127.0.0.1"  # the only address this benchmark talks to


# ------------------------------------------------------------------------------------------ setup


def fit_adapters(folder: Path) -> dict[str, Path]:
    import adaclip

    backbone = adaclip.create_backbone("lite", device="cpu")
    files = {}
    for method in ("zeroshot", "linear-probe", "tip-adapter"):
        adapter = adaclip.fit(
            SAMPLE / "train", method, backbone=backbone, classes=SAMPLE / "classes.json", val_split=0, seed=0
        )
        files[method] = adapter.save(folder / f"{method}.adaclip")
    return files


def predict_rate(adapter_file: Path, images: list[Path], batch_size: int, repeats: int) -> list[float]:
    """images/s of Adapter.predict over `images` (model loaded and warmed up first), `repeats` times."""
    import adaclip

    adapter = adaclip.load(adapter_file, device="cpu")
    adapter.predict(images[:batch_size], batch_size=batch_size)
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        adapter.predict(images, batch_size=batch_size)
        rates.append(len(images) / (time.perf_counter() - started))
    return rates


class Server:
    """`adaclip serve` in a subprocess on 127.0.0.1 and a free port; RSS from /proc."""

    def __init__(self, adapters: list[str], options: list[str]):
        command = [sys.executable, "-m", "adaclip", "serve", *adapters, "--host", HOST, "--port", "0", *options]
        self.command = command
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ})
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 180
        self.url = None
        while self.url is None:
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise RuntimeError("server did not start:\n" + "".join(self.lines))
            for line in list(self.lines):
                match = re.search(rf"running on (http://{re.escape(HOST)}:\d+)", line)
                if match:
                    self.url = match.group(1)
            time.sleep(0.1)

    def _read(self) -> None:
        for line in iter(self.process.stderr.readline, ""):
            self.lines.append(line)

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


# ------------------------------------------------------------------------------------------ load


async def load(
    url: str,
    bodies: list[bytes],
    *,
    clients: int,
    requests: int,
    adapter: str,
    max_seconds: float,
    sample_rss=None,
) -> dict[str, Any]:
    """`clients` concurrent clients share `requests` requests (one image each); stops at the count or
    after `max_seconds`, whichever comes first."""
    import httpx

    latencies: list[float] = []
    statuses: Counter = Counter()
    errors: Counter = Counter()
    no_retry_after = 0
    bad_answers = 0
    rss: list[tuple[int, float]] = []
    counter = itertools.count()
    done = 0
    deadline = time.monotonic() + max_seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker() -> None:
            nonlocal no_retry_after, bad_answers, done
            while time.monotonic() < deadline:
                index = next(counter)
                if index >= requests:
                    return
                started = time.perf_counter()
                try:
                    response = await client.post(
                        "/v1/classify",
                        params={"adapter": adapter, "top_k": 1},
                        content=bodies[index % len(bodies)],
                        headers={"Content-Type": "image/png"},
                    )
                except httpx.HTTPError as exc:
                    errors[type(exc).__name__] += 1
                    continue
                latencies.append(time.perf_counter() - started)
                statuses[response.status_code] += 1
                done += 1
                if response.status_code == 503 and "retry-after" not in response.headers:
                    no_retry_after += 1
                if response.status_code == 200:
                    document = response.json()
                    answers = document["results"] if adapter == "all" else [document]
                    if not all(a["predictions"][0].get("label") for a in answers):
                        bad_answers += 1

        async def sampler() -> None:
            while True:
                rss.append((done, sample_rss()))
                await asyncio.sleep(0.5)

        started = time.perf_counter()
        load_before = os.getloadavg()[0]
        sampling = asyncio.ensure_future(sampler()) if sample_rss else None
        try:
            await asyncio.gather(*(worker() for _ in range(clients)))
        finally:
            if sampling:
                sampling.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampling
        wall = time.perf_counter() - started
        load_after = os.getloadavg()[0]
    ok = statuses.get(200, 0)
    result: dict[str, Any] = {
        "clients": clients,
        "adapter": adapter,
        "requests_planned": requests,
        "requests_sent": sum(statuses.values()) + sum(errors.values()),
        "seconds": round(wall, 2),
        "stopped_by_time_limit": sum(statuses.values()) + sum(errors.values()) < requests,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "connection_errors": dict(errors),
        "failed": sum(v for k, v in statuses.items() if k not in (200, 503)) + sum(errors.values()) + bad_answers,
        "rejected_503": statuses.get(503, 0),
        "rejected_without_retry_after": no_retry_after,
        "images_per_second": round(ok / wall, 2) if wall > 0 else None,
        # the machine is shared: its 1-minute load average before and after the phase (2 cores)
        "load_average_1min": [round(load_before, 2), round(load_after, 2)],
    }
    ok_latencies = sorted(latencies)
    if ok_latencies:
        result["p50_ms"] = round(1000 * _quantile(ok_latencies, 0.50), 1)
        result["p99_ms"] = round(1000 * _quantile(ok_latencies, 0.99), 1)
    if rss:
        result["rss_samples"] = [(n, round(m, 1)) for n, m in rss]
    return result


def _quantile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def memory_summary(samples: list[tuple[int, float]], warm: int) -> dict[str, Any]:
    """RSS after `warm` requests vs at the end, and the growth per 1,000 requests over the run's second half."""
    after_warm = [m for n, m in samples if n >= warm] or [m for _, m in samples]
    half = samples[len(samples) // 2 :]
    slope = None
    if len(half) >= 2 and half[-1][0] > half[0][0]:
        xs, ys = [n for n, _ in half], [m for _, m in half]
        mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
        var = sum((x - mean_x) ** 2 for x in xs)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var * 1000 if var else None
    return {
        "rss_start_mib": samples[0][1],
        "rss_after_warmup_mib": after_warm[0],
        "rss_end_mib": samples[-1][1],
        "rss_max_mib": max(m for _, m in samples),
        "growth_after_warmup_mib": round(samples[-1][1] - after_warm[0], 1),
        "slope_mib_per_1000_requests_second_half": round(slope, 2) if slope is not None else None,
    }


# ------------------------------------------------------------------------------------------ report


def render(report: dict[str, Any]) -> str:
    predict = report["predict"]
    baseline = predict["images_per_second_mean"]
    rows = []
    for phase in report["phases"]:
        row = dict(phase)
        if phase.get("images_per_second") and phase["name"].startswith("sustainable"):
            row["vs_predict"] = round(phase["images_per_second"] / baseline, 2)
            if phase.get("predict_adjacent"):
                nearby = statistics.fmean(phase["predict_adjacent"])
                row["predict_nearby"] = round(nearby, 2)
                row["vs_nearby"] = round(phase["images_per_second"] / nearby, 2)
        row["statuses"] = ", ".join(f"{k}: {v:,}" for k, v in phase["statuses"].items())
        row["load"] = " / ".join(f"{x:.1f}" for x in phase.get("load_average_1min", []))
        rows.append(row)
    memory = report["memory"]
    lines = [
        f"### `adaclip serve` under load ({report['date'][:10]})",
        "",
        f"Command: `{report['command']}` (commit {report['git_commit'][:12]}). Machine: "
        f"{report['machine']['cpu_count']}-core {report['machine']['cpu']}, shared with other jobs while it "
        "ran; the load clients and the server share the same cores. Backbone `lite`, fp32, "
        f"server `{' '.join(report['server_options'])}`, one image per request (raw image/png).",
        "",
        f"`Adapter.predict` on the same {predict['images']} images, batch {predict['batch_size']}: "
        + ", ".join(f"{r:.1f}" for r in predict["images_per_second"])
        + f" img/s (before and after the server runs; mean {baseline:.1f}).",
        "",
        markdown_table(
            rows,
            [
                ("name", "phase"),
                ("clients", "clients"),
                ("adapter", "adapter"),
                ("requests_sent", "requests"),
                ("images_per_second", "img/s"),
                ("vs_predict", "vs predict"),
                ("predict_nearby", "predict img/s just before/after"),
                ("vs_nearby", "vs that"),
                ("p50_ms", "p50 ms"),
                ("p99_ms", "p99 ms"),
                ("statuses", "statuses"),
                ("failed", "failed"),
                ("load", "load avg before / after"),
            ],
        ),
        "",
        f"Memory over {memory['requests']:,} requests ({memory['clients']} clients): RSS "
        f"{memory['rss_after_warmup_mib']:.0f} MiB after {memory['warmup_requests']:,} requests, "
        f"{memory['rss_end_mib']:.0f} MiB at the end (max {memory['rss_max_mib']:.0f}); "
        f"{memory['slope_mib_per_1000_requests_second_half']} MiB per 1,000 requests over the second half.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="requests per throughput phase")
    parser.add_argument("--soak-requests", type=int, default=10_000, help="requests of the memory phase")
    parser.add_argument("--max-seconds", type=float, default=900, help="time limit of each phase")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few requests, results not written")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.soak_requests, args.max_seconds = 40, 200, 60
    os.environ.setdefault("ADACLIP_NO_PROGRESS", "1")

    images = sorted((SAMPLE / "test").rglob("*.png"))
    bodies = [path.read_bytes() for path in images]
    batch = 64  # predict's default batch size; the server batches up to the same
    server_options = ["--max-batch", str(batch), "--batch-wait-ms", "5", "--queue-size", "128", "--device", "cpu"]
    report: dict[str, Any] = {**run_header(), "settings": vars(args) | {"output": str(args.output)}}
    report["server_options"] = server_options
    report["note"] = (
        "2-core VM shared with other jobs; the load clients run on the same cores as the server, so the "
        "server's images/s includes their HTTP work"
    )
    output = args.output or RESULTS / "serve-lite-vm.json"
    with tempfile.TemporaryDirectory() as tmp:
        files = fit_adapters(Path(tmp))
        rates = predict_rate(files["linear-probe"], images, batch, repeats=2)
        print(f"predict: {rates}", file=sys.stderr)
        named = [f"{name}={path}" for name, path in files.items()]
        phases = []
        server = Server(named, server_options)
        try:
            # On a shared machine the load moves by the minute: predict is timed again (with the server
            # idle) right before and after each throughput phase, and each phase's ratio uses those two.
            adjacent = predict_rate(files["linear-probe"], images, batch, repeats=1)
            for clients, adapter in ((1, "linear-probe"), (16, "linear-probe"), (64, "linear-probe"), (16, "all")):
                result = asyncio.run(
                    load(server.url, bodies, clients=clients, requests=args.requests, adapter=adapter,
                         max_seconds=args.max_seconds)
                )  # fmt: skip
                after = predict_rate(files["linear-probe"], images, batch, repeats=1)
                name = f"sustainable, {clients} clients" if adapter != "all" else (
                    "sustainable, adapter=all (3 adapters, one encoding)"
                )  # fmt: skip
                phases.append({"name": name, **result, "predict_adjacent": [round(r, 2) for r in adjacent + after]})
                adjacent = after
                print(phases[-1], file=sys.stderr)
            soak = asyncio.run(
                load(server.url, bodies, clients=16, requests=args.soak_requests, adapter="linear-probe",
                     max_seconds=args.max_seconds, sample_rss=server.rss_mib)
            )  # fmt: skip
        finally:
            server.stop()
        samples = soak.pop("rss_samples", [])
        warm = min(500, args.soak_requests // 10)
        report["memory"] = {
            "requests": soak["requests_sent"],
            "clients": 16,
            "warmup_requests": warm,
            **memory_summary(samples, warm),
            "samples": samples,
        }
        phases.append({"name": "memory soak, 16 clients", **soak})
        overload_options = [*server_options[:4], "--queue-size", "16", "--max-images", "1", "--device", "cpu"]
        server = Server(named, overload_options)
        try:
            result = asyncio.run(
                load(server.url, bodies, clients=128, requests=max(args.requests, 600), adapter="linear-probe",
                     max_seconds=args.max_seconds)
            )  # fmt: skip
        finally:
            server.stop()
        phases.append({"name": "past capacity (--queue-size 16), 128 clients", **result})
        print(phases[-1], file=sys.stderr)
        rates += predict_rate(files["linear-probe"], images, batch, repeats=2)
    report["predict"] = {
        "images": len(images),
        "batch_size": batch,
        "images_per_second": [round(r, 2) for r in rates],
        "images_per_second_mean": round(statistics.fmean(rates), 2),
    }
    report["phases"] = phases
    print(render(report))
    if args.quick:
        return
    write_json(output, report)
    replace_section(DOCS / "benchmarks.md", "serve-cpu", render(report))
    print(f"wrote {output.relative_to(ROOT) if output.is_relative_to(ROOT) else output} and docs/benchmarks.md")


if __name__ == "__main__":
    main()
