"""FSDP2 loads the model on rank 0 only: the other rank never materialises it, and every rank ends
with the weights a plain load gives (issue #17.5).

Two spawned gloo ranks set the process up as the worker does and prepare the
model as the Trainer does (``bench/load_memory.py``'s ``run_case``), on a model
with tied embeddings that grow for 3 added tokens (as a chat
template's do). A resumed FSDP2 run is covered by test_strategies.py
(``test_sharded_checkpoint_resumes_exactly_under_torchrun[fsdp2]``) and
test_families.py (the tied families' resumed runs), which now load this way.
"""

from __future__ import annotations

import pytest

from bench.load_memory import run_case, save_model

SHAPE = {  # 18.6M parameters (71 MiB in fp32), embeddings tied as in most small models
    "hidden_size": 384,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vocab_size": 32000,
    "tie_word_embeddings": True,
}


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("load") / "model"
    return folder, save_model(folder, SHAPE) * 4 / 2**20


def test_only_rank0_loads_and_every_rank_gets_the_plain_weights(model_folder):
    folder, fp32_mib = model_folder
    # Loaded from the folder, then built from its config (seeded), in the same 2 processes.
    opts = {"from_config": [False, True], "check": True, "vocab_size": SHAPE["vocab_size"] + 3}
    loads = run_case("fsdp2-rank0", folder, opts, timeout=300)
    assert all("error" not in load for load in loads), loads
    assert [(load["rank"], load["from_config"]) for load in loads] == [
        (0, False),
        (0, True),
        (1, False),
        (1, True),
    ]
    for load in loads:
        assert load["wrapper"] == "FSDPLlamaForCausalLM"
        # Gathered after preparation: the plain load's weights (grown embeddings included), bitwise.
        assert load["equal_to_plain_load"], load
        assert load["builds_weights"] is (load["rank"] == 0)
        if load["rank"] == 1:  # holds none of the model
            assert load["built_mib"] <= 0.2 * fp32_mib, load
    # Rank 0 holds it whole: the measure sees a model (the second load reuses memory freed by the first).
    assert loads[0]["built_mib"] >= 0.9 * fp32_mib, loads[0]
