"""The run directory: the files other tools read after (and during) a run.

Layout under ``output_uri``::

    job.yaml         the resolved job, overrides applied
    run.json         the run that owns the directory, and what its data cursors depend on
    plan.json        the data plan every restart and resume reads
    epochs.json      train.epochs: the rows of one epoch per rank, counted once for the plan
    control/stop     a stop request (``sft-cluster stop``) the driver polls
    metrics.jsonl    one JSON object per logged step
    events.jsonl     what happened to the run: resumes (with the step), preemptions
    checkpoints/     step-NNNNNNNN/ folders, committed ones carry COMMITTED
    summary.json     outcome of the run
    loss.png         the loss curve
    final/           Hugging Face model + tokenizer
    workers/         one JSON per rank: topology and what that rank saw
    tensorboard/     event files when ``tracking`` includes tensorboard
"""

from sft_cluster.tracking.metrics import JsonlLog, read_jsonl
from sft_cluster.tracking.plot import plot_loss
from sft_cluster.tracking.rundir import RUN_ID_ENV, RunDir, run_dir_of
from sft_cluster.tracking.summary import finalize_run

__all__ = ["RUN_ID_ENV", "JsonlLog", "RunDir", "finalize_run", "plot_loss", "read_jsonl", "run_dir_of"]
