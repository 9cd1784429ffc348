"""Built-in layer discovery for transformers models (decoders, encoders, multimodal language models)."""

from __future__ import annotations

from torch import nn

from ..hooks import hookimpl
from ..layers import LayerStack, default_layer_stack


@hookimpl(trylast=True)
def loraplan_find_layers(model: nn.Module) -> LayerStack | None:
    return default_layer_stack(model)
