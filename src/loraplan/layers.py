"""Finding the transformer layer stack of a model, and the LoRA target modules inside each layer."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, overload

import torch
from torch import nn

from .errors import LayerDiscoveryError
from .hooks.calls import call_hook

if TYPE_CHECKING:
    import pluggy

__all__ = [
    "LayerStack",
    "block_stacks",
    "find_layers",
    "find_stacks",
    "stack_role",
    "linear_modules",
    "other_text_stacks",
    "stack_at",
    "target_modules_of",
    "unwrap",
]

#: model types whose sequence representation is the first token (CLS)
ENCODER_MODEL_TYPES = frozenset(
    {
        "albert",
        "bert",
        "camembert",
        "deberta",
        "deberta-v2",
        "distilbert",
        "electra",
        "ernie",
        "mpnet",
        "modernbert",
        "nomic_bert",
        "roberta",
        "xlm-roberta",
        "xlm-roberta-xl",
    }
)


@dataclass
class LayerStack:
    """Where a model's transformer layers live.

    Attributes:
        layers: the ``nn.ModuleList`` of blocks, in order.
        path: dotted path of that list from the model root, e.g. ``"model.layers"``.
        backbone: the module whose output's ``last_hidden_state`` (or first element) is ``h_L``, the last entry of
            ``output_hidden_states`` (for Llama-like decoders: after the final norm).
        pooling: ``"last"`` (decoders: last non-pad token) or ``"first"`` (encoders: CLS).
        ambiguous: another module list in the model ends with the same name (e.g. a vision tower's ``layers``),
            so PEFT's ``layers_pattern`` cannot tell them apart and the plan is expressed as a regex instead.
    """

    layers: nn.ModuleList
    path: str
    backbone: nn.Module
    pooling: str = "last"
    ambiguous: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def pattern(self) -> str:
        """The name PEFT's ``layers_pattern`` matches: the last component of ``path``."""
        return self.path.rsplit(".", 1)[-1]


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return model
    if isinstance(model, PeftModel):
        return model.get_base_model()
    inner = getattr(model, "model", None)
    if type(model).__name__ == "LoraModel" and isinstance(inner, nn.Module):
        return inner
    return model


def _module_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            classes = {type(m) for m in module}
            if len(classes) == 1:
                found.append((name, module))
    return found


_BLOCK_NAME = re.compile(r"(Layer|Block|DecoderLayer|EncoderLayer)$")
_NON_TEXT = re.compile(r"(^|\.)(vision|visual|image|audio|speech|vit|mm_projector|multi_modal)", re.IGNORECASE)
_TEXT = re.compile(r"(^|\.)(language_model|text_model|model|transformer|gpt_neox|decoder|encoder)(\.|$)")


def _backbone_for(model: nn.Module, path: str) -> nn.Module:
    """The nearest ancestor of the layer list that is a transformers ``PreTrainedModel`` (else the root)."""
    from transformers import PreTrainedModel

    parts = path.split(".")
    best = model
    current = model
    for part in parts[:-1]:
        current = getattr(current, part) if not part.isdigit() else current[int(part)]
        if isinstance(current, PreTrainedModel):
            best = current
    return best


def _pooling_for(model: nn.Module, backbone: nn.Module) -> str:
    for candidate in (backbone, model):
        config = getattr(candidate, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type in ENCODER_MODEL_TYPES:
            return "first"
    return "last"


def block_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every list of identical transformer blocks (``*Layer``/``*Block``) in ``model``, of any modality."""
    return [(name, blocks) for name, blocks in _module_lists(model) if _BLOCK_NAME.search(type(blocks[0]).__name__)]


def is_text_stack(path: str) -> bool:
    """Whether a block list at ``path`` belongs to the text model (not a vision, audio or projector tower)."""
    return not _NON_TEXT.search(path)


def other_text_stacks(model: nn.Module, path: str) -> list[tuple[str, nn.ModuleList]]:
    """Text block stacks of ``model`` other than the one at ``path`` (the other half of an encoder-decoder), leaving
    out lists nested inside that stack or holding it."""
    return [
        (name, blocks)
        for name, blocks in block_stacks(model)
        if name != path and is_text_stack(name) and not name.startswith(path + ".") and not path.startswith(name + ".")
    ]


#: the main inputs (transformers' ``main_input_name``) of the models loraplan plans: tokens, or the audio features of
#: an encoder-decoder speech model whose decoder reads tokens
TEXT_INPUTS = frozenset({"input_ids", "input_features"})


def reads_text(model: nn.Module) -> bool:
    """Whether ``model`` is a model loraplan plans: its main input is tokens (or, for Whisper-like models, audio
    features feeding a token decoder), not pixels or raw audio alone."""
    return getattr(model, "main_input_name", "input_ids") in TEXT_INPUTS


def default_layer_stack(model: nn.Module) -> LayerStack | None:
    """Built-in discovery: the block list of a transformers model (text stack preferred in multimodal models). A
    model whose main input is not text (a vision or audio encoder) has none: loraplan does not plan those."""
    if not reads_text(model):
        return None
    candidates = [(name, blocks) for name, blocks in block_stacks(model) if is_text_stack(name)]
    if not candidates:
        return None
    # prefer the stack inside a language model, then the longest, then the shallowest path
    candidates.sort(
        key=lambda item: (
            "language_model" not in item[0] and "text_model" not in item[0],
            -len(item[1]),
            item[0].count("."),
        )
    )
    path, layers = candidates[0]
    backbone = _backbone_for(model, path)
    return LayerStack(layers=layers, path=path, backbone=backbone, pooling=_pooling_for(model, backbone))


def find_layers(model: nn.Module, pm: pluggy.PluginManager | None = None) -> LayerStack:
    """The layer stack of ``model`` (a PEFT wrapper is looked through): asking the plugins of ``pm`` first (the
    caller's manager, e.g. :func:`loraplan.get_plugin_manager`'s), or by the built-in discovery alone without one.
    No manager is built here: an architecture that a plugin teaches is found with that plugin's manager only."""
    base = unwrap(model)
    stack = call_hook(pm, "loraplan_find_layers", model=base) if pm is not None else default_layer_stack(base)
    if stack is None and not reads_text(base):
        stacks = ", ".join(f"`{name}`" for name, _ in block_stacks(base)) or "none"
        raise LayerDiscoveryError(
            f"{type(base).__name__} is not a text model (its main input is `{base.main_input_name}`; layer stacks: "
            f"{stacks}). loraplan plans the layer stack of a model that reads tokens: decoders, encoders, "
            "encoder-decoders and the language model of a multimodal model; vision-only and audio-only models are "
            "not planned. Fine-tune this one with stock PEFT, or teach loraplan its stack with a "
            "`loraplan_find_layers` plugin (docs/hooks.md) and calibrate it with data it reads."
        )
    if stack is None:
        raise LayerDiscoveryError(
            f"cannot find the transformer layer stack of {type(base).__name__}: no nn.ModuleList of identical "
            "blocks named *Layer/*Block was found, and no plugin recognised the model. Teach loraplan the "
            "architecture with a plugin that implements the `loraplan_find_layers(model)` hook and returns "
            "loraplan.layers.LayerStack(layers=..., path=..., backbone=...) (see docs/hooks.md)."
        )
    if not isinstance(stack, LayerStack):
        raise LayerDiscoveryError(
            f"`loraplan_find_layers` returned {type(stack).__name__} for {type(base).__name__}; "
            "it must return a loraplan.layers.LayerStack or None."
        )
    if len(stack.layers) == 0:
        raise LayerDiscoveryError(f"the layer stack {stack.path!r} of {type(base).__name__} is empty.")
    stack.ambiguous = stack.ambiguous or _name_is_shared(base, stack.path)
    return stack


#: what an encoder-decoder model's stacks are called in ``PlanConfig.stacks`` and in the plan (``stacks[].name``)
STACK_ROLES = ("encoder", "decoder")


def stack_role(path: str) -> str | None:
    """``"encoder"`` or ``"decoder"`` for the stack at ``path`` of an encoder-decoder model (by the path component
    its owner has: ``encoder.block``, ``model.decoder.layers``), else ``None``."""
    parts = path.split(".")
    for role in STACK_ROLES:
        if role in parts:
            return role
    return None


def find_stacks(model: nn.Module, pm: pluggy.PluginManager | None = None) -> list[LayerStack]:
    """The layer stacks loraplan plans in ``model``: the one :func:`find_layers` finds and, for an encoder-decoder
    model (T5, BART, Whisper), the other text stack beside it, encoder first. An encoder stack of such a model pools
    each sample as the mean over its tokens (``pooling="mean"``: its inputs have no CLS token and end with EOS, and
    an audio encoder's frames have no last token); a decoder stack as a decoder does."""
    base = unwrap(model)
    first = find_layers(base, pm)
    others = other_text_stacks(base, first.path)
    if not others:
        return [first]
    stacks = [first] + [stack_at(base, path) for path, _ in others]
    roles = [stack_role(s.path) for s in stacks]
    if len(stacks) != 2 or sorted(r or "" for r in roles) != ["decoder", "encoder"]:
        found = ", ".join(f"`{s.path}`" for s in stacks)
        raise LayerDiscoveryError(
            f"{type(base).__name__} has {len(stacks)} text layer stacks ({found}), which loraplan does not know how "
            "to plan together: it plans one stack, or the encoder and the decoder of an encoder-decoder model. Teach "
            "it the stack to plan with a `loraplan_find_layers` plugin (docs/hooks.md) and leave the others out of "
            "target_modules."
        )
    stacks.sort(key=lambda s: STACK_ROLES.index(stack_role(s.path) or "decoder"))
    for stack in stacks:
        stack.pooling = "mean" if stack_role(stack.path) == "encoder" else "last"
    return stacks


def stack_at(model: nn.Module, path: str) -> LayerStack:
    """The layer stack at a recorded ``path`` (a plan's ``layers.path``), without asking any plugin: code that runs
    after a plan exists reads the stack from where the plan found it, whoever found it."""
    base = unwrap(model)
    try:
        layers = base.get_submodule(path)
    except AttributeError:
        layers = None
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise LayerDiscoveryError(
            f"the plan's layer stack `{path}` is not a non-empty nn.ModuleList in this {type(base).__name__}"
            + (f" (found {type(layers).__name__})" if layers is not None else "")
            + ". The plan was made for another model: recompute it for this one, or load the plan that belongs to it."
        )
    backbone = _backbone_for(base, path)
    return LayerStack(
        layers=layers,
        path=path,
        backbone=backbone,
        pooling=_pooling_for(base, backbone),
        ambiguous=_name_is_shared(base, path),
    )


def _name_is_shared(model: nn.Module, path: str) -> bool:
    """Another module list ends with the same name as the one at ``path`` (PEFT's ``layers_pattern`` cannot tell
    them apart)."""
    last = path.rsplit(".", 1)[-1]
    return any(name != path and name.rsplit(".", 1)[-1] == last for name, _ in _module_lists(model))


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    # GPT-2 style Conv1D (a linear layer with transposed weight)
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_modules(layer: nn.Module) -> dict[str, nn.Module]:
    """Every linear module inside one block, by dotted name relative to the block.

    A PEFT LoRA wrapper counts as its base layer; LoRA's own ``lora_A``/``lora_B`` are skipped.
    """
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover
        BaseTunerLayer = ()
    found: dict[str, nn.Module] = {}
    skip: list[str] = []
    for name, module in layer.named_modules():
        if not name or any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if BaseTunerLayer and isinstance(module, BaseTunerLayer):
            base = module.get_base_layer()
            if _is_linear(base):
                found[name] = module
            skip.append(name)
        elif _is_linear(module):
            found[name] = module
    return found


def target_modules_of(layer: nn.Module, targets: list[str] | None) -> dict[str, nn.Module]:
    """The modules of one block that LoRA targets: names equal to or ending in ``.target`` (PEFT's rule)."""
    modules = linear_modules(layer)
    if targets is None:
        return modules
    return {
        name: module for name, module in modules.items() if any(name == t or name.endswith("." + t) for t in targets)
    }


# -- what a model's modules look like --------------------------------------------------------------------------


def base_layer(module: nn.Module) -> nn.Module:
    """The module under a PEFT wrapper (the module itself when it is not wrapped)."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def features(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of a linear module or of the one a PEFT wrapper holds; GPT-2's ``Conv1D`` keeps its weight
    as (in, out)."""
    inner = base_layer(module)
    if hasattr(inner, "in_features"):
        return int(inner.in_features), int(inner.out_features)
    return int(inner.weight.shape[0]), int(inner.weight.shape[1])


def target_shapes(layer: nn.Module, targets: list[str] | None) -> dict[str, tuple[int, int]]:
    """(in, out) of each module of one block that LoRA targets, by name (sorted)."""
    return {name: features(module) for name, module in sorted(target_modules_of(layer, targets).items())}


def text_config(model: nn.Module) -> Any:
    """The text part of a transformers model's config (the config itself for text-only models), or ``None``."""
    config = getattr(unwrap(model), "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


def hidden_size(config: Any) -> int | None:
    """The hidden size a transformers (text) config declares, under any of its names."""
    return next(
        (v for k in ("hidden_size", "n_embd", "d_model") if isinstance(v := getattr(config, k, None), int)), None
    )


@overload
def parameter_dtype(model: nn.Module, default: torch.dtype) -> torch.dtype: ...
@overload
def parameter_dtype(model: nn.Module, default: None = None) -> torch.dtype | None: ...
def parameter_dtype(model: nn.Module, default: torch.dtype | None = None) -> torch.dtype | None:
    """The dtype of the first floating-point parameter of ``model`` (``default`` without one)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), default)


@overload
def parameter_device(model: nn.Module, default: torch.device) -> torch.device: ...
@overload
def parameter_device(model: nn.Module, default: None = None) -> torch.device | None: ...
def parameter_device(model: nn.Module, default: torch.device | None = None) -> torch.device | None:
    """The device of the first parameter of ``model`` (``default`` without parameters)."""
    return next((p.device for p in model.parameters()), default)
