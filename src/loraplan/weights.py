"""The weights a weight-only selector reads, one target module at a time: from a model in memory
(:class:`ModelWeights`) or streamed from a checkpoint directory's safetensors shards without building the model
(:class:`CheckpointWeights`: each tensor is read from its file into memory of its own and let go after, so the
resident memory stays near one tensor whatever the checkpoint's size).

Both give the same names (the target modules of each layer, relative to the block, sorted) and the same tensors (the
weight as stored: ``(out, in)`` for a linear module), so a selector scores a checkpoint as it scores the model loaded
from it.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import ConfigError, LayerDiscoveryError
from .layers import base_layer, target_modules_of, target_shapes

if TYPE_CHECKING:
    from torch import nn

    from .layers import LayerStack

__all__ = ["CheckpointWeights", "ModelWeights", "WeightSource", "leaf_matches"]

#: safetensors dtypes a weight may be stored in
_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
#: a tensor inside a numbered block: <stack path>.<layer>.<module path>.weight
_BLOCK_TENSOR = re.compile(r"^(?P<path>.+?)\.(?P<layer>\d+)\.(?P<module>.+)\.weight$")


def leaf_matches(name: str, targets: list[str] | None) -> bool:
    """PEFT's rule for a target module name: equal to a target or ending in ``.target``; every name without targets."""
    return targets is None or any(name == t or name.endswith("." + t) for t in targets)


class WeightSource:
    """What a weight-only selector reads (``SelectionContext.weights``): ``num_layers``, the stack's ``path``, and
    per layer the target modules' names and weights."""

    num_layers: int
    path: str
    #: show a progress bar while a selector reads them
    progress: bool = False

    def names(self, layer: int) -> list[str]:  # pragma: no cover - interface
        """The target modules of ``layer``, relative to the block, sorted."""
        raise NotImplementedError

    def weight(self, layer: int, name: str) -> torch.Tensor:  # pragma: no cover - interface
        """The weight of module ``name`` of ``layer``, as stored (``(out, in)`` for a linear module)."""
        raise NotImplementedError

    def shapes(self, layer: int = 0) -> dict[str, tuple[int, int]]:  # pragma: no cover - interface
        """``(in, out)`` of each target module of ``layer``, as the plan records them (``layers.module_shapes``)."""
        raise NotImplementedError


class ModelWeights(WeightSource):
    """The weights of a model in memory (a PEFT wrapper's base layers; bitsandbytes weights dequantized, one module
    at a time, without changing the model)."""

    def __init__(self, stack: LayerStack, targets: list[str] | None) -> None:
        self.stack, self.targets = stack, targets
        self.num_layers, self.path = stack.num_layers, stack.path

    def _modules(self, layer: int) -> dict[str, nn.Module]:
        return target_modules_of(self.stack.layers[layer], self.targets)

    def names(self, layer: int) -> list[str]:
        return sorted(self._modules(layer))

    def weight(self, layer: int, name: str) -> torch.Tensor:
        module = base_layer(self._modules(layer)[name])
        weight = module.weight
        if type(weight).__name__ in ("Params4bit", "Int8Params"):
            from peft.utils.integrations import dequantize_module_weight

            return dequantize_module_weight(module).detach()
        return weight.detach()

    def shapes(self, layer: int = 0) -> dict[str, tuple[int, int]]:
        return target_shapes(self.stack.layers[layer], self.targets)


@dataclass
class _Entry:
    file: Path
    dtype: str
    shape: list[int]
    start: int
    end: int


@dataclass
class CheckpointWeights(WeightSource):
    """The weights of a checkpoint directory (``config.json`` and safetensors shards, one file or an index), read
    tensor by tensor. The layer stack is the numbered blocks with the most layers (``model.layers`` for a Llama)."""

    directory: Path
    targets: list[str] | None = None
    entries: dict[str, _Entry] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        for file in self._files():
            self.entries.update(_header(file))
        self.path, self.num_layers = self._stack()
        self._by_layer = self._targets()
        if not self._by_layer[0]:
            raise ConfigError(
                f"`target_modules` {self.targets!r} match no 2-D weight of layer 0 of {self.directory} "
                f"({self.path}.0 has {', '.join(sorted(self._modules_of(0))) or 'none'}). Name modules it has."
            )

    def _files(self) -> list[Path]:
        index, single = self.directory / _INDEX, self.directory / _SINGLE
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
            return sorted({self.directory / name for name in weight_map.values()})
        if single.is_file():
            return [single]
        raise ConfigError(
            f"{self.directory} has no safetensors weights ({_INDEX} or {_SINGLE}); weight-only selectors stream "
            "safetensors shards. Save the model with save_pretrained(..., safe_serialization=True), or plan the model "
            "in memory with make_plan(model, None, config)."
        )

    def _stack(self) -> tuple[str, int]:
        layers: dict[str, set[int]] = {}
        for name in self.entries:
            if match := _BLOCK_TENSOR.match(name):
                layers.setdefault(match["path"], set()).add(int(match["layer"]))
        complete = {path: len(found) for path, found in layers.items() if found == set(range(len(found)))}
        if not complete:
            raise LayerDiscoveryError(
                f"no numbered layer stack (<path>.<layer>.<module>.weight) among the tensors of {self.directory}."
            )
        path = max(sorted(complete), key=lambda p: complete[p])
        return path, complete[path]

    def _modules_of(self, layer: int) -> dict[str, str]:
        prefix = f"{self.path}.{layer}."
        return {
            name[len(prefix) : -len(".weight")]: name
            for name, entry in self.entries.items()
            if name.startswith(prefix) and name.endswith(".weight") and len(entry.shape) == 2
        }

    def _targets(self) -> list[dict[str, str]]:
        return [
            {
                module: tensor
                for module, tensor in sorted(self._modules_of(i).items())
                if leaf_matches(module, self.targets)
            }
            for i in range(self.num_layers)
        ]

    def names(self, layer: int) -> list[str]:
        return list(self._by_layer[layer])

    def weight(self, layer: int, name: str) -> torch.Tensor:
        entry = self.entries[self._by_layer[layer][name]]
        if entry.dtype not in _DTYPES:
            raise ConfigError(
                f"{self._by_layer[layer][name]} in {entry.file.name} is stored as {entry.dtype}; weight-only "
                f"selectors read {', '.join(_DTYPES)} weights (a quantized checkpoint: plan the loaded model)."
            )
        buffer = bytearray(entry.end - entry.start)
        with entry.file.open("rb") as handle:
            handle.seek(entry.start)
            handle.readinto(memoryview(buffer))
        return torch.frombuffer(buffer, dtype=_DTYPES[entry.dtype]).reshape(entry.shape)

    def shapes(self, layer: int = 0) -> dict[str, tuple[int, int]]:
        found = {}
        for module, tensor in self._by_layer[layer].items():
            out_features, in_features = self.entries[tensor].shape
            found[module] = (in_features, out_features)
        return found

    def config(self) -> dict[str, Any]:
        """The checkpoint's ``config.json``."""
        return json.loads((self.directory / "config.json").read_text(encoding="utf-8"))

    @property
    def num_parameters(self) -> int:
        """Parameters of every tensor in the checkpoint (from the headers)."""
        return sum(math.prod(entry.shape) for entry in self.entries.values())


def _header(file: Path) -> dict[str, _Entry]:
    """The tensors of one safetensors file: dtype, shape and the byte range of their data (the 8-byte header length,
    then the JSON header, then the data)."""
    with file.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ConfigError(f"{file} is not a safetensors file (shorter than its header).")
        (length,) = struct.unpack("<Q", prefix)
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{file} is not a safetensors file (its header is not JSON: {exc}).") from exc
    base = 8 + length
    return {
        name: _Entry(
            file, info["dtype"], list(info["shape"]), base + info["data_offsets"][0], base + info["data_offsets"][1]
        )
        for name, info in header.items()
        if name != "__metadata__"
    }
