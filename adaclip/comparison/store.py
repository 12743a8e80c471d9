"""A comparison's out_dir: every run's adapter and record, the protocol a resumed comparison must
match, the leaderboard and the recommended adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..data import files_digest
from ..errors import UsageError
from .leaderboard import Leaderboard
from .protocol import Protocol
from .runs import RunResult

RESULTS_FILE = "compare.json"
PROTOCOL_FILE = "protocol.json"  # written before the first run: a resumed comparison must match it
BEST_FILE = "best.adaclip"


class RunStore:
    """out_dir/: runs/<method>-seed<seed>.{adaclip,json}, compare.json, best.adaclip."""

    def __init__(self, root: Path, *, resume: bool, force: bool):
        if root.exists() and not root.is_dir():
            raise UsageError("--out-dir is not a folder", path=root)
        earlier = (root / RESULTS_FILE).exists() or (root / PROTOCOL_FILE).exists()
        if earlier and not (resume or force):
            raise UsageError(
                "the output folder holds an earlier comparison", path=root, fix="pass --resume to finish it, or --force"
            )
        (root / "runs").mkdir(parents=True, exist_ok=True)
        self.root = root
        self.force = force

    def _stem(self, method: str, seed: int) -> Path:
        return self.root / "runs" / f"{method.replace('+', '-')}-seed{seed}"

    def adapter_path(self, method: str, seed: int) -> Path:
        return self._stem(method, seed).with_suffix(".adaclip")

    def check_protocol(self, protocol: Protocol, settings: dict[str, Any]) -> None:
        """A resumed comparison must use the same splits and settings, or its rows would not be
        comparable; --force starts over (earlier run records are dropped, not resumed)."""
        marker = self.root / PROTOCOL_FILE
        document = json.loads(
            json.dumps(
                {
                    "protocol": protocol.describe(),
                    "test_digest": files_digest(protocol.test, protocol.root),
                    "settings": settings,
                },
                default=str,
            )
        )
        if self.force:
            for record in (self.root / "runs").glob("*.json"):
                record.unlink()
        elif marker.exists():
            try:
                earlier = json.loads(marker.read_text())
            except ValueError:
                earlier = None
            if earlier != document:
                raise UsageError(
                    "the output folder holds runs of a different protocol (data, shots, splits or settings differ)",
                    path=self.root,
                    fix="use another --out-dir, or --force to start over",
                )
        marker.write_text(json.dumps(document, indent=2) + "\n")

    def finished(self, method: str, seed: int) -> RunResult | None:
        record = self._stem(method, seed).with_suffix(".json")
        if not record.exists() or not self.adapter_path(method, seed).exists():
            return None
        try:
            return RunResult.from_dict(json.loads(record.read_text()))
        except (OSError, ValueError, TypeError):
            return None  # a torn record: run it again

    def save_run(self, result: RunResult) -> None:
        path = self._stem(result.method, result.seed).with_suffix(".json")
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result.to_dict()) + "\n")
        tmp.replace(path)

    def keep_best(self, board: Leaderboard) -> str | None:
        """Copy the recommended method's adapter (its seed with the best validation accuracy)."""
        if board.recommended is None:
            return None
        mine = [r for r in board.runs if r.method == board.recommended and r.adapter_path]
        if not mine:
            return None
        best = max(mine, key=lambda r: (r.val_accuracy or 0.0, -r.seed))
        target = self.root / BEST_FILE
        shutil.copyfile(best.adapter_path, target.with_suffix(".tmp"))
        target.with_suffix(".tmp").replace(target)
        return str(target)

    def save_leaderboard(self, board: Leaderboard) -> None:
        path = self.root / RESULTS_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(board.to_dict(runs=True), indent=2) + "\n")
        tmp.replace(path)
