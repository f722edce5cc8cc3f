"""The goodput model of docs/goodput.md: Daly's interval and the expected goodput at it, beside fixed
intervals of 10 min and 1 h, for clusters of 1 to 512 nodes, a fast and a slow checkpoint stall.

    .venv/bin/python bench/goodput_model.py [--node-mttf-hours 1000] [--restart-s 300]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sft_cluster.train.interval import daly_interval_s, expected_goodput  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--node-mttf-hours", type=float, default=1000.0)
    parser.add_argument("--restart-s", type=float, default=300.0)
    args = parser.parse_args()
    print("| nodes | job MTTF | stall | Daly interval | goodput there | at 10 min | at 1 h |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for nodes in (1, 8, 64, 512):
        mttf = args.node_mttf_hours * 3600 / nodes
        for stall in (3.0, 30.0):
            tau = daly_interval_s(stall, mttf)
            at = [expected_goodput(t, stall, mttf, args.restart_s) * 100 for t in (tau, 600, 3600)]
            print(
                f"| {nodes} | {mttf / 3600:.1f} h | {stall:g} s | {tau / 60:.1f} min | "
                f"{at[0]:.2f}% | {at[1]:.2f}% | {at[2]:.2f}% |"
            )


if __name__ == "__main__":
    main()
