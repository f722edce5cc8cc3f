"""The run directory (``rundir.RunDir`` names its layout) and the files tools read after a run."""

from sft_cluster.tracking.metrics import JsonlLog, read_jsonl
from sft_cluster.tracking.plot import plot_loss
from sft_cluster.tracking.rundir import RUN_ID_ENV, RunDir, run_dir_of
from sft_cluster.tracking.summary import finalize_run

__all__ = ["RUN_ID_ENV", "JsonlLog", "RunDir", "finalize_run", "plot_loss", "read_jsonl", "run_dir_of"]
