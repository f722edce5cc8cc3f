"""What the streamed export of ``final/`` (``sft_cluster.train.export``) must match of ``save_pretrained``
and peft (issue #17.5)."""

from __future__ import annotations

from typing import Any


def weight_conversions(model: Any) -> bool:
    """Whether ``save_pretrained`` converts tensors before writing (fused MoE experts; no dense family).

    transformers 5.23: ``revert_weight_conversion`` uses ``model._weight_conversions``, else
    ``get_model_conversion_mapping(model, add_legacy=False)`` less ``PrefixChange``.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange

    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:
        mapping = get_model_conversion_mapping(model, add_legacy=False)
        conversions = [c for c in mapping if not isinstance(c, PrefixChange)]
    return bool(conversions)


def save_order(model: Any, names: list[str]) -> list[str]:
    """The order ``save_pretrained`` gives the state dict's keys (and so how it fills shards).

    transformers 5.23: ``revert_weight_conversion`` returns the state dict as it is when the
    model has no conversions and no ``_weight_conversions`` (made from a config); a model from
    ``from_pretrained`` has that list, even empty, and its keys come out sorted by ``dot_natural_key``.
    """
    from transformers.core_model_loading import dot_natural_key

    if getattr(model, "_weight_conversions", None) is None:
        return names
    return sorted(names, key=dot_natural_key)


def lora_layers(model: Any) -> dict[str, tuple[Any, Any, Any]]:
    """{name of an adapted module: (A, B, delta)}; ``delta(a, b)`` (whole factors) is what merging adds.

    peft 0.21.2: ``lora.Linear.get_delta_weight`` is ``B @ A`` (transposed if ``fan_in_fan_out``)
    times ``scaling``, added to ``base_layer.weight`` by ``merge``. Other layer kinds are refused.
    """
    from peft.tuners.lora import Linear, LoraLayer

    def delta_of(layer: Any) -> Any:
        return lambda a, b: ((b @ a).T if layer.fan_in_fan_out else b @ a) * layer.scaling["default"]

    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            if not isinstance(module, Linear):
                raise NotImplementedError(f"{name}: merging a {type(module).__name__} LoRA layer at export")
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            layers[name.removeprefix("_orig_mod.")] = (a, b, delta_of(module))
    return layers
