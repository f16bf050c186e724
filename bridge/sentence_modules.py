"""What a sentence-transformers model does after its transformer, read from its own files.

A sentence-transformers folder lists its modules in `modules.json`: the transformer, then a Pooling
(cls, mean, max, mean_sqrt_len_tokens, weightedmean or lasttoken, or several concatenated), any Dense
layers (a linear map and an activation: the multilingual CLIP text models map 768 -> 512 this way) and
a Normalize. Its longest input is `max_seq_length` (sentence_bert_config.json) or, as sentence-transformers
6 saves it, the tokenizer's model_max_length. `read_sentence_modules` turns those files into one
description that both the torch tower (text.py) and its NumPy twin (numpy_text.py) follow, so each embeds
a caption as `SentenceTransformer.encode` does. A module it cannot reproduce exactly is refused by name,
never skipped: a model embedding differently from how it was trained is the silent failure this prevents.

Torch-free (NumPy and huggingface_hub only). Nothing is unpickled and no class named in the files is
imported: a Dense layer's activation is looked up in a fixed table of torch's own.

Not here: running the transformer or the modules (text.py, numpy_text.py).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bridge.config import ConfigError, resolve_model_name

log = logging.getLogger(__name__)

MODULES_FILE = "modules.json"
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# sentence-transformers 2-5 saved the pooling as one boolean per mode; 6 saves `pooling_mode`.
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# Dense activations by the class name sentence-transformers saves ("torch.nn.modules.activation.Tanh").
ACTIVATIONS = ("Identity", "Tanh", "ReLU", "GELU", "Sigmoid", "SiLU")
# Modules that do nothing at inference: dropout is off in eval mode.
_INERT = ("Dropout",)


@dataclass(frozen=True)
class DenseLayer:
    weight: np.ndarray  # (out_features, in_features) float32
    bias: np.ndarray | None  # (out_features,) or None
    activation: str  # one of ACTIVATIONS


@dataclass(frozen=True)
class SentenceModules:
    transformer: str  # the folder (or hub name) of the transformer's weights and tokenizer
    subfolder: str  # where in it the transformer lives ("" for all models saved since 2021)
    pooling: tuple[str, ...]  # modes, concatenated in this order
    dense: tuple[DenseLayer, ...]
    normalize: bool
    max_seq_length: int | None  # None: the tokenizer's and the model's own limits
    lowercase: bool  # do_lower_case: the caption is lowercased before tokenising

    def settings(self) -> str:
        """What decides the embeddings besides the weights, as one string (for fingerprints)."""
        return json.dumps(
            {
                "pooling": self.pooling,
                "dense": [layer.activation for layer in self.dense],
                "normalize": self.normalize,
                "max_seq_length": self.max_seq_length,
                "lowercase": self.lowercase,
            }
        )


def read_sentence_modules(name: str) -> SentenceModules | None:
    """The module stack of the model folder or hub repository `name`, or None when it has no
    modules.json (a plain transformers model). A stack that cannot be reproduced is refused (ConfigError)."""
    name = resolve_model_name(name)
    modules_file = _model_file(name, MODULES_FILE)
    if modules_file is None:
        return None
    try:
        modules = json.loads(Path(modules_file).read_text(encoding="utf-8"))
        modules = sorted(modules, key=lambda module: module.get("idx", 0))
        kinds = [(str(module["type"]).rsplit(".", 1)[-1], module.get("path", "")) for module in modules]
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise ConfigError(f"'{modules_file}' is not a sentence-transformers modules list ({error})") from None
    if not kinds or kinds[0][0] != "Transformer":
        raise ConfigError(
            f"'{name}' starts with a '{kinds[0][0] if kinds else 'nothing'}' module, not a Transformer; "
            "dinobridge runs sentence-transformers models built on a transformers model"
        )
    subfolder = kinds[0][1]
    pooling, dense, normalize = None, [], False
    for kind, path in kinds[1:]:
        if kind == "Pooling" and pooling is None and not dense and not normalize:
            pooling = _pooling_modes(name, path)
        elif kind == "Dense" and pooling is not None and not normalize:
            dense.append(_dense_layer(name, path))
        elif kind == "Normalize" and pooling is not None:
            normalize = True
        elif kind not in _INERT:
            raise ConfigError(
                f"'{name}' has a sentence-transformers '{kind}' module (at '{path or '.'}') that dinobridge "
                "cannot reproduce exactly; it runs Pooling, Dense and Normalize after the transformer. "
                "Use kind 'hf-encoder' on the transformer alone, or another model"
            )
    settings = _read_json(name, f"{subfolder}/sentence_bert_config.json".lstrip("/")) or {}
    st_config = _read_json(name, "config_sentence_transformers.json") or {}
    if st_config.get("default_prompt_name"):
        raise ConfigError(
            f"'{name}' prepends the prompt '{st_config['default_prompt_name']}' to every input, which "
            "dinobridge does not do; use a model without a default prompt"
        )
    max_seq_length = settings.get("max_seq_length")
    return SentenceModules(
        transformer=name,
        subfolder=subfolder,
        pooling=pooling or ("mean",),  # sentence-transformers adds mean pooling when a model has none
        dense=tuple(dense),
        normalize=normalize,
        max_seq_length=max_seq_length if isinstance(max_seq_length, int) else None,
        lowercase=bool(settings.get("do_lower_case", False)),
    )


def _pooling_modes(name: str, path: str) -> tuple[str, ...]:
    settings = _read_json(name, f"{path}/config.json") or {}
    # include_prompt matters only with a prompt, and a model with a default prompt is refused.
    if "pooling_mode" in settings:
        mode = settings["pooling_mode"]
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    else:
        modes = tuple(mode for key, mode in _LEGACY_POOLING_KEYS.items() if settings.get(key))
    unknown = [mode for mode in modes if mode not in POOLING_MODES]
    if unknown:
        raise ConfigError(
            f"'{name}/{path}' pools by '{unknown[0]}'; dinobridge knows {', '.join(POOLING_MODES)}"
        )
    return modes or ("mean",)


def _dense_layer(name: str, path: str) -> DenseLayer:
    settings = _read_json(name, f"{path}/config.json") or {}
    activation = str(settings.get("activation_function", "torch.nn.modules.activation.Tanh"))
    short = activation.rsplit(".", 1)[-1]
    if not activation.startswith("torch.") or short not in ACTIVATIONS:
        raise ConfigError(
            f"'{name}/{path}' is a Dense layer with activation '{activation}'; dinobridge runs "
            f"{', '.join(ACTIVATIONS)} from torch.nn and never imports a class a model folder names"
        )
    weights_file = _model_file(name, f"{path}/model.safetensors")
    if weights_file is None:
        raise ConfigError(
            f"'{name}/{path}' has no model.safetensors (an older pytorch_model.bin is a pickle, which "
            "dinobridge never loads); re-save the model with sentence-transformers 2.3 or newer"
        )
    from safetensors.numpy import load_file

    weights = load_file(weights_file)
    if "linear.weight" not in weights:
        raise ConfigError(f"'{weights_file}' has no linear.weight; it is not a Dense layer's weights")
    bias = weights.get("linear.bias")
    return DenseLayer(
        weight=weights["linear.weight"].astype(np.float32),
        bias=None if bias is None else bias.astype(np.float32),
        activation=short,
    )


def _read_json(name: str, file_name: str) -> dict | None:
    path = _model_file(name, file_name)
    if path is None:
        return None
    try:
        settings = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"'{path}' cannot be read as JSON ({error}); restore the model's files") from None
    return settings if isinstance(settings, dict) else None


def _model_file(name: str, file_name: str) -> str | None:
    """The local path of `file_name` in the model folder or hub repository `name`, or None if it has
    none. A hub file comes through huggingface_hub's cache (HF_HUB_OFFLINE reads only the cache)."""
    file_name = file_name.lstrip("/")
    if Path(name).is_dir():
        path = Path(name) / file_name
        return str(path) if path.is_file() else None
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError

    try:
        cached = try_to_load_from_cache(name, file_name)
        if isinstance(cached, str) or cached is not None:  # a path, or the cache's note that it is absent
            return cached if isinstance(cached, str) else None
        return hf_hub_download(name, file_name)
    except (EntryNotFoundError, HFValidationError):
        return None  # not in the repository (or not a repository name: loading the model says so)
    except (LocalEntryNotFoundError, OSError):
        if file_name == MODULES_FILE and isinstance(try_to_load_from_cache(name, "config.json"), str):
            # Offline or unreachable with the model cached but not this file: say so, since the tower then
            # mean pools as a plain encoder, which may not be how the model was trained. (Nothing cached:
            # loading the model fails with its own message.)
            offline = "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else "the Hub is unreachable"
            log.warning(
                "cannot tell whether '%s' has a modules.json (%s); embedding it as a plain encoder",
                name,
                offline,
            )
        return None
