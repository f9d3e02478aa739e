"""``logger=tensorboard``: scalars per step / epoch / round, the config as text and as TensorBoard's hparams (so a
sweep's runs line up in its HParams tab against their headline numbers).

Written with TensorBoard's own event writer and protos, not torch's ``SummaryWriter``: the tracking child process
(tracking/sidecar.py) then never imports torch, which took seconds of a CPU the training was using. The records are
the ones ``SummaryWriter`` writes (``add_scalar``, ``add_text``, and ``hparams`` into the run's own event file, as
Lightning does).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from aisec_train.store import validate_output_path
from aisec_train.tracking.base import RunInfo, check_output_path
from aisec_train.tracking.config import TensorBoardLoggerConfig


class TensorBoardBackend:
    name = "tensorboard"
    package = "tensorboard"

    @staticmethod
    def check(cfg: TensorBoardLoggerConfig, info: RunInfo) -> None:
        """Before any work, creating nothing (the folder is made when the first figure is written)."""
        check_output_path(info.run_dir / cfg.log_dir / "events", info.run_dir, "logger.tensorboard.log_dir")

    def __init__(self, cfg: TensorBoardLoggerConfig, info: RunInfo):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        where = info.run_dir / cfg.log_dir / "events"  # made here, without following a link planted since the check
        validate_output_path(where, root=info.run_dir, what="logger.tensorboard.log_dir")
        self.writer = EventFileWriter(str(info.run_dir / cfg.log_dir), flush_secs=30)
        self.params: dict[str, Any] = {}

    def _write(self, summary, step: int, wall_time: float | None = None) -> None:
        from tensorboard.compat.proto.event_pb2 import Event

        self.writer.add_event(Event(summary=summary, wall_time=wall_time or time.time(), step=int(step)))

    def log_params(self, params: dict[str, Any]) -> None:
        self.params = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()}
        table = "\n".join(f"| {k} | {v} |" for k, v in self.params.items())
        self._write(_text("config", "| key | value |\n|---|---|\n" + table), 0)

    def log_metrics(self, values: dict[str, float], step: int, axis: str, wall_time: float | None = None) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=k, simple_value=v) for k, v in values.items()])
        self._write(summary, step, wall_time)  # wall_time: when training measured it (the sidecar's stamp)
        if axis != "step":  # an epoch's or a round's values readable at once, not within flush_secs
            self.writer.flush()

    def finish(self, headline: dict[str, float], files: dict[str, Path]) -> None:
        self.log_metrics(headline, 0, "final")
        for summary in _hparams(self.params, list(headline)):
            self._write(summary, 0)

    def close(self, ok: bool) -> None:
        self.writer.close()


def _plugin(name: str, content: bytes):
    from tensorboard.compat.proto.summary_pb2 import SummaryMetadata

    return SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=name, content=content))


def _text(tag: str, text: str):
    """What ``SummaryWriter.add_text`` writes: a string tensor under ``<tag>/text_summary``, for the text plugin."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
    from tensorboard.plugins.text.plugin_data_pb2 import TextPluginData

    tensor = TensorProto(dtype="DT_STRING", string_val=[text.encode()],
                         tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]))  # fmt: skip
    meta = _plugin("text", TextPluginData(version=0).SerializeToString())
    return Summary(value=[Summary.Value(tag=f"{tag}/text_summary", metadata=meta, tensor=tensor)])


def _hparams(params: dict[str, Any], metrics: list[str]):
    """The hparams plugin's experiment, session-start and session-end records (torch's ``summary.hparams``)."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    start, infos = plugin_data_pb2.SessionStartInfo(), []
    for key, value in params.items():
        if isinstance(value, bool):  # before int: a bool is an int
            start.hparams[key].bool_value, kind = value, "DATA_TYPE_BOOL"
        elif isinstance(value, (int, float)):
            start.hparams[key].number_value, kind = value, "DATA_TYPE_FLOAT64"
        else:
            start.hparams[key].string_value, kind = str(value), "DATA_TYPE_STRING"
        infos.append(api_pb2.HParamInfo(name=key, type=api_pb2.DataType.Value(kind)))
    experiment = api_pb2.Experiment(
        hparam_infos=infos, metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=m)) for m in metrics]
    )
    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.Status.Value("STATUS_SUCCESS"))
    records = [
        (metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment)),
        (metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_start_info=start)),
        (metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=end)),
    ]
    out = []
    for tag, data in records:
        data.version = metadata.PLUGIN_DATA_VERSION
        meta = _plugin(metadata.PLUGIN_NAME, data.SerializeToString())
        out.append(Summary(value=[Summary.Value(tag=tag, metadata=meta)]))
    return out
