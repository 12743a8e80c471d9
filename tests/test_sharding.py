"""predict / eval / tta across torchrun's processes (adaclip.sharding): the same records as one process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from adaclip.distributed import DistContext
from adaclip.sharding import map_in_order, owned_indices, rounds

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"
LITE = ["-b", "lite", "--device", "cpu"]

# ------------------------------------------------------------------------------------------ the rule


@dataclass(frozen=True)
class ReplayContext(DistContext):
    """A rank of a world without a process group: rank 0's broadcasts are recorded, other ranks replay
    them, and all_gather_object returns what `gathered` says the others contributed."""

    sent: tuple = ()

    def broadcast_object(self, value):
        if self.rank == 0:
            self.sent[0].append(value)  # type: ignore[index]
            return value
        return self.sent[0].pop(0)  # type: ignore[index]

    def all_gather_object(self, value):
        return [value if r == self.rank else [f"rank{r}"] for r in range(self.world)]


def test_rank_takes_whole_batches_r_r_plus_n():
    assert owned_indices(11, 2, DistContext(rank=0, world=3)) == [0, 1, 6, 7]
    assert owned_indices(11, 2, DistContext(rank=1, world=3)) == [2, 3, 8, 9]
    assert owned_indices(11, 2, DistContext(rank=2, world=3)) == [4, 5, 10]
    every = sorted(i for r in range(3) for i in owned_indices(11, 2, DistContext(rank=r, world=3)))
    assert every == list(range(11))  # each input on exactly one rank


@pytest.mark.parametrize("as_stream", [False, True])
def test_rounds_are_the_same_for_a_list_and_a_stream_and_end_together(as_stream):
    items = [f"p{i}" for i in range(7)]
    log: list = []
    seen = {}
    for rank in (0, 1):  # rank 0 first: it records what it broadcasts, rank 1 replays it
        ctx = ReplayContext(rank=rank, world=2, sent=(log,))
        source = iter(items) if as_stream else items
        seen[rank] = list(rounds(source if rank == 0 or not as_stream else iter(()), 2, ctx))
    assert seen[0] == [[(0, "p0"), (1, "p1")], [(4, "p4"), (5, "p5")]]
    assert seen[1] == [[(2, "p2"), (3, "p3")], [(6, "p6")]]
    assert log == []  # rank 1 consumed every broadcast rank 0 made (the last one: the end)


def test_a_stream_that_fails_on_rank_zero_fails_on_every_rank():
    def paths():
        yield "a"
        raise ValueError("no such file: b")

    log: list = []
    with pytest.raises(ValueError, match="no such file"):
        list(rounds(paths(), 1, ReplayContext(rank=0, world=2, sent=(log,))))
    with pytest.raises(ValueError, match="no such file"):
        list(rounds(iter(()), 1, ReplayContext(rank=1, world=2, sent=(log,))))


def test_map_in_order_concatenates_the_ranks_batches_in_rank_order():
    ctx = ReplayContext(rank=1, world=3)
    calls = []

    def process(part):
        calls.append(part)
        return [f"done{i}" for i, _ in part]

    out = list(map_in_order(list(range(5)), 2, process, ctx))
    assert out == [["rank0"], ["done2", "done3"], ["rank2"]]
    assert calls == [[(2, 2), (3, 3)]]


# ------------------------------------------------------------------------------------------ 2 gloo processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    # The same thread count in both runs: kernels may sum in a different order with more threads.
    return dict(os.environ, ADACLIP_NO_PROGRESS="1", OMP_NUM_THREADS="1")


def adaclip(*args: str, processes: int = 1, stdin: str | None = None) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "adaclip"]
    if processes > 1:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "1",
            "--nproc-per-node",
            str(processes),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(_free_port()),
            "-m",
            "adaclip",
        ]
    run = subprocess.run([*launcher, *args], input=stdin, capture_output=True, text=True, env=_env(), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    """A lite zeroshot adapter, a labelled test folder and an unlabeled folder, each with one
    unreadable image (counted across the ranks)."""
    root = tmp_path_factory.mktemp("shard")
    adapter = root / "zs.adaclip"
    adaclip("fit", str(SAMPLE), "-m", "zeroshot", "--classes", str(SAMPLE / "classes.json"), *LITE, "-o", str(adapter))
    labelled = root / "test"
    for folder in sorted((SAMPLE / "test").iterdir())[:4]:
        shutil.copytree(folder, labelled / folder.name)
    (labelled / "bag" / "broken.png").write_bytes(b"not a png")
    unlabeled = root / "shifted"
    unlabeled.mkdir()
    for image in sorted((SAMPLE / "shifted").glob("*.png"))[:13]:
        shutil.copy(image, unlabeled / image.name)
    (unlabeled / "shifted_004b.png").write_bytes(b"\x89PNG truncated")
    return {"adapter": adapter, "labelled": labelled, "unlabeled": unlabeled}


@pytest.mark.slow
def test_predict_jsonl_is_byte_identical_across_two_processes(work):
    paths = "\n".join(str(p) for p in sorted(work["unlabeled"].glob("*.png"))) + "\n"
    common = ["predict", str(work["adapter"]), "-", "-f", "jsonl", "--batch-size", "3", "-k", "3"]
    one = adaclip(*common, stdin=paths)
    # stdin is read by rank 0 and broadcast per round; 14 inputs in batches of 3 leave rank 1 without
    # a batch in the last round
    two = adaclip(*common, stdin=paths, processes=2)
    assert len(one.stdout.splitlines()) == 13
    assert two.stdout == one.stdout
    # the unreadable image (input 5) is in rank 1's batch; rank 0 counts it and speaks for both
    assert two.stderr.count("predicted 13 images, skipped 1 unreadable") == 1


@pytest.mark.slow
def test_predict_across_two_nodes_is_byte_identical_to_one_process(work):
    """Two torchrun launchers of one process each, joined by the multi-node flags (--nnodes 2,
    --node-rank, the master's address and port) as two machines would be, here both on 127.0.0.1:
    the same records as one process, printed once, by the node that holds rank 0."""
    paths = "\n".join(str(p) for p in sorted(work["unlabeled"].glob("*.png"))) + "\n"
    common = ["predict", str(work["adapter"]), "-", "-f", "jsonl", "--batch-size", "3", "-k", "3"]
    one = adaclip(*common, stdin=paths)
    port = str(_free_port())
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
            + ["--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", port, "-m", "adaclip"]
            + common,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for node in (0, 1)
    ]
    outputs = [node.communicate(paths, timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outputs]
    assert outputs[0][0] == one.stdout and outputs[1][0] == ""
    assert len(one.stdout.splitlines()) == 13


@pytest.mark.slow
def test_eval_metrics_are_identical_across_two_processes(work, tmp_path):
    def run(processes: int) -> tuple[dict, str]:
        out, per_image = tmp_path / f"eval{processes}.json", tmp_path / f"eval{processes}.jsonl"
        common = ["eval", str(work["adapter"]), str(work["labelled"]), "--batch-size", "8", "-f", "json"]
        printed = adaclip(*common, "-o", str(out), "--predictions", str(per_image), processes=processes).stdout
        document = json.loads(out.read_text())
        assert json.loads(printed) == document  # rank 0 printed it once
        document.pop("seconds")
        return document, per_image.read_text()

    (one, one_lines), (two, two_lines) = run(1), run(2)
    assert one["skipped_images"] == 1 and one["n_images"] == len(one_lines.splitlines())
    assert two == one
    assert two_lines == one_lines


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, extra", [("online", ["--batch-size", "4"]), ("tda", ["--batch-size", "4"]), ("episodic", ["--views", "4"])]
)
def test_tta_records_are_identical_across_two_processes(work, tmp_path, mode, extra):
    common = ["tta", str(work["adapter"]), str(work["unlabeled"]), "--mode", mode, "-f", "jsonl", *extra]
    if mode != "tda":
        common += ["--force"]
    saved = {}
    runs = {}
    for processes in (1, 2):
        output = ["-o", str(tmp_path / f"{processes}.adaclip")] if mode != "tda" else []
        runs[processes] = adaclip(*common, *output, processes=processes)
        if output:
            saved[processes] = Path(output[1]).read_bytes()
    assert len(runs[1].stdout.splitlines()) == 13
    assert runs[2].stdout == runs[1].stdout
    if saved:
        # the same mask; the files differ only in their creation time
        from adaclip.adapter_file import read_adapter_file

        one, two = (read_adapter_file(tmp_path / f"{p}.adaclip") for p in (1, 2))
        assert one[1].keys() == two[1].keys()
        assert all(one[1][k].equal(two[1][k]) for k in one[1])
