"""The torchrun executor's pure parts: exit codes, torchrun's arguments, the first node's word."""

from __future__ import annotations

import signal
import threading

import pytest

from sft_cluster.driver.torchrun import NodeWord, TorchrunExecutor, exit_code
from tests.fixtures.s3 import free_port


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ({75}, 75),
        ({75, -signal.SIGTERM}, 75),  # the agent ended the others after the first exited 75
        ({2}, 2),
        ({2, -signal.SIGTERM}, 2),
        ({75, 1}, 1),  # one rank failed for another reason: not a clean preemption
        ({1}, 1),
        ({-signal.SIGKILL}, 1),
    ],
)
def test_worker_exit_codes_become_the_drivers(codes, expected):
    assert exit_code(codes) == expected


def test_torchrun_arguments_standalone_and_rendezvous(tmp_path):
    job = tmp_path / "job.yaml"
    alone = TorchrunExecutor(job, 1, 2, None, "x").torchrun_args()
    assert alone == ["--nnodes=1", "--nproc-per-node=2", "--standalone", "--max-restarts=0"] + [
        "-m",
        "sft_cluster.train",
        str(job),
    ]
    spread = TorchrunExecutor(job, 2, 4, "10.0.0.1:29501", "77").torchrun_args()
    assert "--rdzv-endpoint=10.0.0.1:29501" in spread and "--rdzv-id=77" in spread
    assert TorchrunExecutor(job, 2, 4, "h:1", "77").world(None) == (8, 2)


@pytest.mark.parametrize("code", [0, 2])
def test_other_nodes_wait_for_the_first_nodes_word(code):
    """A node that is not the first starts its agent only on 0, else ends with the first's code."""
    endpoint = f"127.0.0.1:{free_port()}"
    first = NodeWord(endpoint, 3, first=True)
    taken: list[int] = []

    def other() -> None:
        taken.append(NodeWord(endpoint, 3, first=False).take())

    others = [threading.Thread(target=other) for _ in range(2)]
    for thread in others:
        thread.start()
    first.give(code)  # with a refusal, returns once both others have read it
    for thread in others:
        thread.join(timeout=30)
    assert taken == [code, code]
