"""The streamed ``final/`` writer (``sft_cluster.train.export``) against ``save_pretrained`` and peft.

Single process on tiny real-family models: the same files, index and tensors as
``save_pretrained`` writes (one shard, several shards, bf16, tied embeddings), and
a LoRA merge equal to peft's ``merge_and_unload``. Sharded strategies (FSDP2,
ZeRO-3) are covered by tests/integration/test_strategies.py and the two-rank
FSDP2 and ZeRO-3 tests here.
"""

from __future__ import annotations

import copy
import json
import os
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sft_cluster.spec import SpecError, load_job
from sft_cluster.train.export import _Gatherer, _save_adapter, export_model
from tests.fixtures.families import build_family


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: build_family(name, root / name) for name in ("llama3", "qwen2_5")}


def _load(folder: Path) -> AutoModelForCausalLM:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    merged: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        merged.update(load_file(file))
    return merged


def _same_output(ours: Path, reference: Path) -> None:
    """Same weight files, index and tensors (bitwise), and the same config."""
    assert sorted(p.name for p in ours.glob("model*")) == sorted(p.name for p in reference.glob("model*"))
    index = "model.safetensors.index.json"
    if (reference / index).exists():
        assert json.loads((ours / index).read_text()) == json.loads((reference / index).read_text())
    for file in reference.glob("*.safetensors"):
        theirs, mine = load_file(file), load_file(ours / file.name)
        assert mine.keys() == theirs.keys(), file.name
        for key, tensor in theirs.items():
            assert mine[key].dtype == tensor.dtype and torch.equal(mine[key], tensor), key
    config = json.loads((ours / "config.json").read_text())
    assert config == json.loads((reference / "config.json").read_text())


@pytest.mark.parametrize("family", ["llama3", "qwen2_5"])  # untied, tied embeddings
@pytest.mark.parametrize("shard", ["5GB", "40KB"])
def test_export_writes_what_save_pretrained_writes(families, tmp_path: Path, family: str, shard: str) -> None:
    model = _load(families[family])
    model.save_pretrained(tmp_path / "ref", max_shard_size=shard)
    export_model(model, tmp_path / "ours", dtype=torch.float32, max_shard_size=shard, main=True)
    _same_output(tmp_path / "ours", tmp_path / "ref")
    if shard == "40KB":
        assert len(list((tmp_path / "ours").glob("model-*-of-*.safetensors"))) > 2
    if family == "qwen2_5":
        assert not any(key.startswith("lm_head") for key in _tensors(tmp_path / "ours"))
    loaded = _load(tmp_path / "ours").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_bf16_export_casts_every_float_tensor(families, tmp_path: Path) -> None:
    model = _load(families["qwen2_5"])
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp_path / "ref", max_shard_size="40KB")
    export_model(model, tmp_path / "ours", dtype=torch.bfloat16, max_shard_size="40KB", main=True)
    _same_output(tmp_path / "ours", tmp_path / "ref")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["dtype"] == "bfloat16"
    assert next(model.parameters()).dtype == torch.float32  # the live model is left alone
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "ours").dtype == torch.bfloat16


def _trained_lora(folder: Path):
    """A PEFT model of the family with non-zero B factors (zero at start: a merge would change nothing)."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(_load(folder), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(1)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_()
    return peft_model


def test_adapter_alone_is_what_peft_saves(families, tmp_path: Path) -> None:
    peft_model = _trained_lora(families["qwen2_5"])
    _save_adapter(peft_model, _Gatherer(torch.float32, True, False), False, tmp_path / "ours")
    peft_model.save_pretrained(tmp_path / "ref")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name


def test_lora_merge_equals_peft_merge_and_unload(families, tmp_path: Path) -> None:
    peft_model = _trained_lora(families["qwen2_5"])
    export_model(peft_model, tmp_path / "ours", dtype=torch.float32, max_shard_size="40KB", main=True)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    merged.save_pretrained(tmp_path / "ref", max_shard_size="40KB")
    _same_output(tmp_path / "ours", tmp_path / "ref")
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    initial = _load(families["qwen2_5"]).state_dict()[q_proj]
    assert not torch.equal(_tensors(tmp_path / "ours")[q_proj], initial)


def _fsdp2_rank(rank: int, port: int, source: str, out: str) -> None:
    """One of two gloo ranks: FSDP2-shard the model, export it (collective)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = _load(Path(source))
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        assert hasattr(next(model.parameters()), "full_tensor")
        export_model(model, Path(out), dtype=torch.bfloat16, max_shard_size="8KB", main=rank == 0)
    finally:
        dist.destroy_process_group()


def _export_on_two_ranks(rank_fn, tmp_path: Path, tied: bool) -> None:
    """Save a small Llama with odd sizes (131-token vocabulary, MLP 97: the ranks' shards and
    partitions differ in size) as ``source``; ``rank_fn(rank, port, source, out)`` on two ranks."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=97,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=131,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "source")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(
        rank_fn, args=(port, str(tmp_path / "source"), str(tmp_path / "ours")), nprocs=2
    )


def test_fsdp2_export_on_two_ranks_equals_the_whole_model(tmp_path: Path) -> None:
    """Odd row counts: the ranks' shards differ in size."""
    _export_on_two_ranks(_fsdp2_rank, tmp_path, tied=True)
    reference = _load(tmp_path / "source").to(torch.bfloat16)
    reference.save_pretrained(tmp_path / "ref", max_shard_size="8KB")
    assert len(list((tmp_path / "ours").glob("model-*.safetensors"))) > 1
    _same_output(tmp_path / "ours", tmp_path / "ref")


def _zero3_rank(rank: int, port: int, source: str, out: str) -> None:
    """One of two gloo ranks: a bf16 ZeRO-3 engine (DeepSpeed's CPU accelerator) exports fp32 and bf16."""
    import torch.distributed as dist

    from sft_cluster.train import compat

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    os.environ.update(
        compat.deepspeed_env(on_gpu=False), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
    )
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        import deepspeed

        model = _load(Path(source))
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "bf16": {"enabled": True},
            "zero_allow_untested_optimizer": True,
        }
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config, dist_init_required=False
        )
        params = list(engine.module.parameters())
        assert all(p.dtype == torch.bfloat16 and p.ds_tensor.numel() < p.ds_numel for p in params)
        ids = torch.arange(32).reshape(2, 16) % 131
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()  # the fp32 masters move by less than bf16 can hold
        from deepspeed.utils import safe_get_full_fp32_param

        masters = {name: safe_get_full_fp32_param(p) for name, p in engine.module.named_parameters()}
        with deepspeed.zero.GatheredParameters(params):
            weights = {name: p.detach().clone() for name, p in engine.module.named_parameters()}
        if rank == 0:
            Path(out).mkdir()
            torch.save({"masters": masters, "weights": weights}, Path(out) / "reference.pt")
        for dtype, folder in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            export_model(
                engine.module,
                Path(out) / folder,
                dtype=dtype,
                max_shard_size="8KB",
                main=rank == 0,
                fp32_masters=True,
            )
    finally:
        dist.destroy_process_group()


def test_zero3_export_streams_partitions_and_reads_the_fp32_masters(tmp_path: Path) -> None:
    """ZeRO-3 on two ranks, each partition sent to rank 0 in turn (odd sizes: the last one padded),
    one step into training. The fp32 export is DeepSpeed's fp32 masters, which the bf16 module weights
    only round: reading the module weights would fail the comparison; the bf16 export is the weights."""
    _export_on_two_ranks(_zero3_rank, tmp_path, tied=False)
    reference = torch.load(tmp_path / "ours" / "reference.pt")
    masters, weights = reference["masters"], reference["weights"]
    assert any(not torch.equal(masters[name], weights[name].float()) for name in masters)
    assert len(list((tmp_path / "ours" / "fp32").glob("model-*.safetensors"))) > 1
    for folder, expected in (("fp32", masters), ("bf16", weights)):
        written = _tensors(tmp_path / "ours" / folder)
        assert written.keys() == expected.keys()
        for name, tensor in expected.items():
            assert written[name].dtype == tensor.dtype and torch.equal(written[name], tensor), (folder, name)


MINIMAL = """\
name: t
model: {name_or_path: builtin:tiny-llama, from_config: true}
data: {sources: [{uri: builtin:smoke-chat.jsonl}]}
train: {max_steps: 10}
"""


def test_export_section_defaults_and_mistakes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("job.yaml").write_text(MINIMAL)
    job = load_job("job.yaml")
    assert (job.export.dtype, job.export.max_shard_size) == ("auto", "5GB")
    Path("job.yaml").write_text(MINIMAL + "export: {dtype: fp16, max_shard_size: 5G}\n")
    with pytest.raises(SpecError) as caught:
        load_job("job.yaml")
    lines = str(caught.value).splitlines()
    assert any(line.startswith("error: job.yaml: export.dtype = 'fp16': ") for line in lines), lines
    size = "error: job.yaml: export.max_shard_size = '5G': expected a whole number and a unit: "
    assert any(line.startswith(size) for line in lines), lines


def test_compat_weight_conversions_tells_dense_from_fused_experts(families) -> None:
    """compat.weight_conversions (transformers 5.23): none for a dense family, some for Mixtral's experts;
    if this fails, re-check how ``save_pretrained`` reverts conversions (``revert_weight_conversion``)."""
    from transformers import MixtralConfig

    from sft_cluster.train import compat

    assert not compat.weight_conversions(_load(families["llama3"]))
    tiny = MixtralConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    with torch.device("meta"):
        assert compat.weight_conversions(AutoModelForCausalLM.from_config(tiny))
