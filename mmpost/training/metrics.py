"""Metrics of a run: ``metrics.jsonl`` (one JSON object per line) and TensorBoard, main process only.

Training lines carry ``step``, ``loss``, ``lr`` and throughput; evaluation lines carry ``step`` and
``eval/...`` keys; the run's skipped-sample count is in both as ``data/skipped``.

A kill or a full disk during a write can leave the last line torn; readers drop a torn last line (it is
written again when the run resumes) and name the file and line of any other line that does not parse.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from mmpost.data.sample import DataError

log = logging.getLogger("mmpost")


class MetricsLog:
    """Appends metric records to ``RUN/metrics.jsonl`` and ``RUN/tb/`` (TensorBoard)."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))

    def truncate_after(self, step: int) -> None:
        """On resume, drops lines written after the checkpoint's step (they will be written again)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [json.dumps(r) for r in read_metrics(self.path.parent) if r["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``RUN/metrics.jsonl``, without a torn last line.

    Raises:
        DataError: naming the file and line of a record, other than the last, that is not a JSON object with
            a ``step``.
    """
    path = Path(run_dir) / "metrics.jsonl"
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError("not a metrics record with a step")
        except ValueError as err:
            if number == len(lines):
                log.warning("%s: dropped a torn last line (%d characters): %s", path, len(line), err)
                continue
            raise DataError(f"{path}: line {number} is not a metrics record ({err}); fix or delete that line") from None
        records.append(record)
    return records
