"""`PlanConfig`: every setting of a plan, defined and validated once.

The HF callback, the Axolotl args model and the CLI all build a :class:`PlanConfig`; none of them keeps its own
defaults or its own validation. The checks, and the values the settings allow, are :mod:`loraplan.config_checks`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .config_checks import (
    COST_MODELS,
    LAST_TOKEN_MODES,
    POOLINGS,
    RANK_POLICIES,
    STACK_NAMES,
    STACK_SETTINGS,
    check_budgets,
    check_calibration,
    check_cost,
    check_data,
    check_options,
    check_ranks,
    check_selection,
    check_stacks,
    check_switches,
    check_target_modules,
)
from .errors import ConfigError, closest

# the values the settings allow are defined beside their checks (loraplan.config_checks) and imported from here
__all__ = [
    "COST_MODELS",
    "LAST_TOKEN_MODES",
    "POOLINGS",
    "RANK_POLICIES",
    "STACK_NAMES",
    "STACK_SETTINGS",
    "TRUNCATE_BACKWARD_HELP",
    "PlanConfig",
    "Setting",
    "setting",
    "settings",
]

#: the switch every integration takes beside the plan settings (``apply_plan(truncate_backward=...)``), described once
TRUNCATE_BACKWARD_HELP = (
    "Run the layers below the lowest planned layer without autograd and without activation checkpointing (exact; "
    "left off, with the reason in the log and the plan, when something below is trainable). Default: on; "
    "`false` back-propagates every layer, as stock PEFT does."
)


def setting(
    *,
    help: str,
    default: Any = dataclasses.MISSING,
    default_factory: Any = dataclasses.MISSING,
    choices: tuple[str, ...] | None = None,
    aliases: tuple[str, ...] = (),
    metavar: str | None = None,
) -> Any:
    """A :class:`PlanConfig` field with its description: ``help`` is what every front end shows, ``choices`` the
    allowed strings, ``aliases`` extra command-line flags (``--no-...`` for a flag that turns a setting off), and
    ``metavar`` how the command line names the value."""
    metadata = {"help": help, "choices": choices, "aliases": aliases, "metavar": metavar}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Setting:
    """One setting as the front ends present it (see :func:`settings`)."""

    name: str
    #: the annotation as written, e.g. ``"float | None"``
    type: str
    default: Any
    help: str
    choices: tuple[str, ...] | None
    aliases: tuple[str, ...]
    metavar: str | None

    @property
    def flag(self) -> str:
        """The command-line flag: ``--`` and the name with dashes."""
        return "--" + self.name.replace("_", "-")


@dataclass
class PlanConfig:
    """Settings of a plan: which strategy, how many layers, how to calibrate.

    Every setting is described once, in its field's metadata (``help``; ``choices``, ``aliases``, ``metavar`` for
    the command line): the CLI flags, the Axolotl ``loraplan:`` block and the TRL recipe's ``loraplan:`` section
    are generated from it (:func:`settings`), and so is the ``Args:`` section below.
    """

    selector: str = setting(
        default="cka",
        help=(
            "Name of the layer selector: a built-in (`cka`, `activation`, `gradient`, `lora_drop`, `random`, `top`, "
            "`bottom`, `every_other`, `all`; `none` for one stack of an encoder-decoder model, see `stacks`; the "
            "weight-only `snr` and `condition`, which need no calibration data) or any installed plugin's."
        ),
    )
    ratio: float = setting(
        default=0.5,
        help=("Fraction of the layers to keep, in (0, 1]: `k = floor(ratio * L)`, at least 1."),
    )
    count: int | None = setting(
        default=None,
        help=("Explicit number of layers to keep, 1..L. Overrides `ratio`."),
    )
    cumulative: float | None = setting(
        default=None,
        help=(
            "Cumulative-threshold mode (Act-LoRA): keep the smallest set of highest-scoring layers whose "
            "normalised importance sums to at least this value, in (0, 1]. Overrides `ratio` and `count`."
        ),
    )
    share: str | None = setting(
        default=None,
        help=(
            "Name of the sharer: a built-in (`angular`, ShareLoRA; `odd_even`, its naive baseline; `lora_drop`, the "
            "unselected layers share one module set) or a plugin's; `None` for no sharing."
        ),
    )
    share_threshold: float = setting(
        default=0.85,
        help=(
            "Similarity threshold ε of ShareLoRA's grouping, in [0, 1]. The paper used 0.85 for LLaMA-1/2, 0.80 "
            "for LLaMA-3, 0.9 for LLaVA."
        ),
    )
    rank_policy: str | int = setting(
        default="keep",
        help=(
            'Rank of the planned LoRA modules: `"keep"` the LoRA config\'s `r`; `"budget"` ShareLoRA\'s budget '
            'rule `r\' = floor(L r / (L - sum|S| + |S|))`; `"importance"` per-layer ranks in proportion to the '
            "selector's scores (within `param_budget`, see `min_rank`, `rank_multiple`); or an explicit positive "
            "integer."
        ),
        metavar="keep|budget|importance|R",
    )
    min_rank: int = setting(
        default=1,
        help=(
            'With `rank_policy="importance"`: the smallest rank a layer gets. A layer whose share of the budget '
            "rounds below it is left out, and its share goes to the others."
        ),
    )
    rank_multiple: int = setting(
        default=1,
        help=(
            'With `rank_policy="importance"`: every allocated rank is a multiple of this (e.g. 4 or 8, which suits '
            "GPU kernels)."
        ),
    )
    max_rank: int | None = setting(
        default=None,
        help=(
            "With `rank_policy=\"importance\"`: the largest rank a layer gets (a serving engine's cap, e.g. vLLM's "
            "`max_lora_rank`); what a capped layer would have had goes to the others, the budget still spent within "
            "one `rank_multiple`. Default: no cap."
        ),
    )
    calibration_samples: int = setting(
        default=128,
        help=("Number of calibration samples N, taken in order from the data (no shuffle), as the reference does."),
        aliases=("--samples",),
    )
    max_length: int = setting(
        default=512,
        help=("Tokens per sample; longer samples are truncated."),
    )
    batch_size: int = setting(
        default=8,
        help=("Samples per calibration forward pass."),
    )
    seed: int = setting(
        default=0,
        help=("Seed for the `random` selector and anything else random."),
    )
    target_modules: list[str] | None = setting(
        default=None,
        help=(
            "Names of the LoRA target modules whose inputs the activation and gradient metrics read. Default: the "
            "wrapped model's LoRA targets, or every linear module inside the layers."
        ),
        metavar="NAME,NAME",
    )
    text_field: str = setting(
        default="text",
        help=("Column or JSON key that holds the calibration text."),
    )
    target_field: str = setting(
        default="target",
        help=(
            "Column or key that holds the decoder's text of an encoder-decoder calibration row (T5, BART); a row "
            "without it gives the decoder its `text_field` text too."
        ),
    )
    image_field: str = setting(
        default="image",
        help=(
            "Column or key that holds the image of a multimodal calibration row, read with a `processor` "
            "(LLaVA-style models)."
        ),
    )
    pooling: str = setting(
        default="auto",
        help=(
            'One vector per sample: `"last"` non-pad token (decoders), `"first"` token (encoders, CLS), `"mean"` '
            'over the real tokens, or `"auto"` to decide from the architecture (the encoder of an encoder-decoder '
            'model: `"mean"`).'
        ),
        choices=POOLINGS,
    )
    last_token: str = setting(
        default="auto",
        help=(
            'How the last real token is found: `"auto"` the last token of the attention mask that is not a trailing '
            "EOS (formatted SFT rows all end with EOS, which would make every sample the same vector there); "
            '`"mask"` the last token of the attention mask, EOS or not; or `"reference"` from `input_ids != pad_id` '
            "with pad = eos, as the CKA reference code does (it drops every eos, also one inside a sample)."
        ),
        choices=LAST_TOKEN_MODES,
    )
    debiased: bool = setting(
        default=False,
        help=("Use the debiased (unbiased HSIC) CKA estimator; needs at least 4 samples."),
    )
    stability: bool = setting(
        default=True,
        help=("Also score each half of the calibration data and store the rank correlation of the two rankings."),
    )
    time_budget: float | None = setting(
        default=None,
        help=(
            "Step-time budget as a fraction of LoRA on every layer, in (0, 1]: choose, under the selector's "
            "scores, the set of layers with the highest summed importance whose step time the cost model predicts "
            "within the budget. A plan's lowest layer decides how much of the network is back-propagated "
            "(loraplan runs the layers below it without autograd), so the choice trades importance against "
            "backward depth; every candidate cut is recorded in the plan (`cost.budget`). Overrides `ratio`; "
            "`count` caps the layers."
        ),
    )
    param_budget: float | None = setting(
        default=None,
        help=(
            "Trainable-parameter budget as a fraction of LoRA on every layer, in (0, 1], counted at the plan's "
            "rank before sharing (sharing only lowers it). Overrides `ratio`; with `time_budget` both must hold."
        ),
    )
    lora_drop_steps: int | None = setting(
        default=None,
        help=(
            'With `selector="lora_drop"`: optimizer steps of the all-layer LoRA warm-up whose outputs score the '
            "layers. Default: one epoch over the calibration batches. The warm-up weights are discarded."
        ),
    )
    cost_model: str = setting(
        default="flops",
        help=(
            'How the cost model prices a layer: `"flops"` from the module shapes (deterministic: the same plan '
            'on every run and rank); `"timed"`, a few timed forward and backward passes of a copy of layer 0 '
            'and of the head on the model\'s device; or `"fitted"`, real training steps of the whole model in '
            "three layouts timed on its device and fitted to a fixed part, a cost per layer with LoRA and a cost "
            "per back-propagated layer (the structure of the recorded H200 table, which it replays within 1.1 %; "
            "its own GPU timing is not validated yet; about two minutes for SmolLM2 on a CPU)."
        ),
        choices=COST_MODELS,
    )
    cost_checkpointing: bool = setting(
        default=True,
        help=(
            "Whether training checkpoints activations; what `time_budget` assumes. The plan records predictions "
            "for both."
        ),
        aliases=("--no-checkpointing",),
    )
    cost_shape: list[int] | None = setting(
        default=None,
        help=(
            "`[batch, sequence length]` of a training step, for the cost model. Default: `[batch_size, max_length]`."
        ),
        metavar="BATCHxLENGTH",
    )
    stacks: dict[str, dict[str, Any]] | None = setting(
        default=None,
        help=(
            'Per-stack settings of an encoder-decoder model (T5, BART, Whisper): `{"encoder": {...}, "decoder": '
            "{...}}`, each with any of `selector`, `ratio`, `count`, `cumulative`, `share`, `share_threshold`, which "
            'then hold for that stack instead of the top-level ones; e.g. `{"encoder": {"selector": "top", '
            '"count": 2}, "decoder": {"selector": "all"}}` adapts the last two encoder layers and every '
            "decoder layer. Every stack is scored, selected and shared on its own either way."
        ),
        metavar="STACK.KEY=VALUE",
    )
    options: dict[str, Any] = setting(
        default_factory=dict,
        help=("Settings for third-party strategies, passed through untouched and recorded in the plan."),
        metavar="KEY=VALUE",
    )

    def __post_init__(self) -> None:
        # one check per group of related settings, in field order, each error naming its key and the fix
        # (loraplan.config_checks); `target_modules` and `cost_shape` come back as lists
        check_selection(
            selector=self.selector,
            ratio=self.ratio,
            count=self.count,
            cumulative=self.cumulative,
            share=self.share,
            share_threshold=self.share_threshold,
        )
        check_ranks(
            rank_policy=self.rank_policy,
            min_rank=self.min_rank,
            rank_multiple=self.rank_multiple,
            max_rank=self.max_rank,
        )
        check_calibration(
            lora_drop_steps=self.lora_drop_steps,
            calibration_samples=self.calibration_samples,
            max_length=self.max_length,
            batch_size=self.batch_size,
            seed=self.seed,
        )
        self.target_modules = check_target_modules(self.target_modules)
        check_data(
            text_field=self.text_field,
            target_field=self.target_field,
            image_field=self.image_field,
            pooling=self.pooling,
            last_token=self.last_token,
        )
        check_switches(debiased=self.debiased, stability=self.stability, cost_checkpointing=self.cost_checkpointing)
        check_budgets(time_budget=self.time_budget, param_budget=self.param_budget, cumulative=self.cumulative)
        self.cost_shape = check_cost(cost_model=self.cost_model, cost_shape=self.cost_shape)
        if self.stacks is not None:
            check_stacks(self.stacks, self.for_stack)
        check_options(self.options)

    def for_stack(self, name: str | None) -> PlanConfig:
        """The settings that hold for the stack called ``name`` (``"encoder"``, ``"decoder"``): these with the
        stack's own ``stacks`` entry applied (validated again); these themselves for a single-stack model."""
        overrides = (self.stacks or {}).get(name or "", {})
        return dataclasses.replace(self, stacks=None, **overrides) if overrides else self

    # -- conversions -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlanConfig:
        """Build from a mapping; an unknown key is an error that lists the known ones."""
        if isinstance(data, PlanConfig):
            return data
        if not isinstance(data, dict):
            raise ConfigError(f"a loraplan config must be a mapping of settings, got {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            hints = []
            for key in unknown:
                close = closest(key, known)
                hints.append(f"`{key}`" + (f" (did you mean `{close}`?)" if close else ""))
            raise ConfigError(
                f"unknown loraplan setting(s) {', '.join(hints)}. Known settings: {', '.join(sorted(known))}."
            )
        return cls(**data)

    def replace(self, **changes: Any) -> PlanConfig:
        """A copy with some settings changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def step_shape(self) -> list[int]:
        """`[batch, sequence length]` the cost model assumes."""
        return list(self.cost_shape) if self.cost_shape is not None else [self.batch_size, self.max_length]

    def layer_count(self, num_layers: int) -> int:
        """`k`, the number of layers to keep out of `num_layers` (before any cumulative threshold)."""
        if self.count is not None:
            if self.count > num_layers:
                raise ConfigError(
                    f"`count` must be between 1 and the model's {num_layers} layers, got {self.count}. "
                    f"Lower it, or use ratio=... for a fraction."
                )
            return self.count
        return max(1, math.floor(self.ratio * num_layers + 1e-9))


def settings() -> list[Setting]:
    """Every :class:`PlanConfig` setting, in field order, with its type, default and description: the one source the
    CLI, the Axolotl block and the TRL recipe build their options from."""
    found = []
    for f in dataclasses.fields(PlanConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        found.append(
            Setting(
                name=f.name,
                type=str(f.type),
                default=default,
                help=f.metadata["help"],
                choices=f.metadata["choices"],
                aliases=tuple(f.metadata["aliases"]),
                metavar=f.metadata["metavar"],
            )
        )
    return found


def _args_section() -> str:
    import textwrap

    lines = ["", "    Args:"]
    for item in settings():
        given = "*optional*" if item.default is None else f"defaults to `{item.default!r}`"
        lines.append(f"        {item.name} (`{item.type}`, {given}):")
        lines += textwrap.wrap(
            item.help, 116, initial_indent=" " * 12, subsequent_indent=" " * 12, break_on_hyphens=False
        )
    return "\n".join(lines) + "\n    "


PlanConfig.__doc__ = (PlanConfig.__doc__ or "").rstrip() + "\n" + _args_section()
