"""TensorBoard logging and figures (each figure saved as PNG and logged as an image)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from madistill.names import short_name

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the headless Agg backend (figures are written to files and TensorBoard, never
    shown), imported by the first figure drawn: importing matplotlib is a large part of a stage's start-up, and
    a stage with ``logger.figures=false`` draws none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class TBLogger:
    """A SummaryWriter for one run directory, plus PNG figures under ``figure_dir``."""

    def __init__(self, log_dir: str | Path, figure_dir: str | Path | None = None, enabled: bool = True):
        self.log_dir = Path(log_dir)
        self.figure_dir = Path(figure_dir) if figure_dir is not None else None
        self.enabled = enabled
        self._writer: SummaryWriter | None = None
        self._purge_step: int | None = None
        self._last: dict[str, float] = {}

    @property
    def writer(self) -> SummaryWriter | None:
        """The SummaryWriter (None when disabled), opened at the first event: a run that stops before logging
        anything leaves no event file."""
        if self.enabled and self._writer is None:
            self._writer = SummaryWriter(str(self.log_dir), purge_step=self._purge_step)
        return self._writer

    def continue_from(self, step: int) -> None:
        """Continue the curves of a run resumed at ``step`` in this log dir: TensorBoard drops the events an
        earlier process logged after ``step`` (past the checkpoint it resumes from), so each tag stays one
        curve. Call it before logging anything."""
        self._purge_step = step + 1

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._last[tag] = float(value)
        if self.writer is not None:
            self.writer.add_scalar(tag, float(value), step)

    def last(self, tag: str) -> float:
        """The last value logged under ``tag`` in this process (NaN if none)."""
        return self._last.get(tag, float("nan"))

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def histogram(self, tag: str, values: Any, step: int) -> None:
        if self.writer is not None:
            self.writer.add_histogram(tag, values, step)

    def figure(self, tag: str, fig: Figure, step: int = 0) -> Path | None:
        """Save ``fig`` as ``<figure_dir>/<tag>.png`` and log it; closes the figure."""
        path = None
        if self.figure_dir is not None:
            path = self.figure_dir / f"{short_name(tag.replace('/', '_'))}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            part = path.with_name(f".{path.name}.part")  # renamed when complete: a failed save leaves no PNG
            try:
                fig.savefig(part, format="png", dpi=120, bbox_inches="tight")
                part.replace(path)
            except BaseException:
                part.unlink(missing_ok=True)
                raise
        if self.writer is not None:
            self.writer.add_figure(tag, fig, step, close=False)
        pyplot().close(fig)
        return path

    def hparams(self, hparam_dict: dict[str, Any], metric_dict: dict[str, float]) -> None:
        """Write hparams into *this* run (not a timestamped sub-run, as ``add_hparams`` would), so sweeps
        compare side by side in TensorBoard's HParams tab."""
        if self.writer is None or not metric_dict:
            return
        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparam_dict.items()}
        exp, ssi, sei = hparams(clean, metric_dict)
        fw = self.writer._get_file_writer()
        for summary in (exp, ssi, sei):
            fw.add_summary(summary)
        for k, v in metric_dict.items():
            self.writer.add_scalar(k, v, 0)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> TBLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
