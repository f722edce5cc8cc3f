"""The run directory: the files other tools read after (and during) a run.

Layout under ``output_uri``::

    job.yaml         the resolved job, overrides applied
    metrics.jsonl    one JSON object per logged step
    summary.json     outcome of the run
    loss.png         the loss curve
    final/           Hugging Face model + tokenizer
    workers/         one JSON per rank: topology and what that rank saw
    tensorboard/     event files when ``tracking`` includes tensorboard
"""

from sft_cluster.tracking.metrics import MetricsLog, read_metrics
from sft_cluster.tracking.plot import plot_loss
from sft_cluster.tracking.rundir import RunDir
from sft_cluster.tracking.summary import finalize_run

__all__ = ["MetricsLog", "RunDir", "finalize_run", "plot_loss", "read_metrics"]
