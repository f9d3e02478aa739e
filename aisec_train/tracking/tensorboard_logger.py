"""``logger=tensorboard``: scalars per step / epoch / round, the config as text and as TensorBoard's hparams (so a
sweep's runs line up in its HParams tab against their headline numbers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aisec_train.store import validate_output_path
from aisec_train.tracking.base import RunInfo
from aisec_train.tracking.config import TensorBoardLoggerConfig


class TensorBoardBackend:
    name = "tensorboard"
    package = "tensorboard"

    def __init__(self, cfg: TensorBoardLoggerConfig, info: RunInfo):
        from torch.utils.tensorboard import SummaryWriter

        log_dir = info.run_dir / cfg.log_dir
        validate_output_path(log_dir / "events", root=info.run_dir, what="logger.tensorboard.log_dir")
        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.params: dict[str, Any] = {}

    def log_params(self, params: dict[str, Any]) -> None:
        self.params = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()}
        table = "\n".join(f"| {k} | {v} |" for k, v in self.params.items())
        self.writer.add_text("config", "| key | value |\n|---|---|\n" + table)

    def log_metrics(self, values: dict[str, float], step: int, axis: str) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def finish(self, headline: dict[str, float], files: dict[str, Path]) -> None:
        from torch.utils.tensorboard.summary import hparams

        for key, value in headline.items():
            self.writer.add_scalar(key, value, 0)
        # Written into this run's own event file (not add_hparams' extra sub-run), as Lightning does.
        for summary in hparams(self.params, {k: v for k, v in headline.items()}):
            self.writer.file_writer.add_summary(summary)

    def close(self, ok: bool) -> None:
        self.writer.close()
