"""TextBridge: a frozen encoder, a trained projector and a frozen text tower in one shared space.

The user-facing model of the text route: `encode_image`, `encode_text`, `similarity`, per-patch
embeddings, and `save_pretrained` / `from_pretrained`. A saved bridge is a directory with `config.json`
(what the encoder and tower are, by hub name or absolute local path), the trained weights in
`model.safetensors` (a few MB), and `encoder/` only when the encoder was built from a config and so
exists nowhere else. Nothing is ever unpickled.

Not here: training (training/align.py) or the image index (index.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from bridge.config import BridgeConfig, ConfigError, from_dict, to_dict
from bridge.fingerprint import fingerprint
from bridge.projectors import build_projector
from bridge.text import TextTower, build_text_tower
from bridge.vision import FrozenEncoder, VisionFeatures, check_image_size

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ENCODER_DIR = "encoder"  # where an encoder built from a config is saved inside a bridge

ImageInput = Sequence[Image.Image] | torch.Tensor | VisionFeatures


class TextBridge(nn.Module):
    """Frozen encoder -> trained projector -> the frozen text tower's embedding space."""

    def __init__(self, config: BridgeConfig, encoder: FrozenEncoder, tower: TextTower, projector: nn.Module):
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.tower = tower
        self.projector = projector
        # Learnable temperature (CLIP's 1/0.07 start) and bias (SigLIP's -10 start); each loss uses its own.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))

    @classmethod
    def from_config(cls, config: BridgeConfig) -> TextBridge:
        """A new bridge with an untrained projector. Width mismatches fail before weights are built."""
        encoder = FrozenEncoder.from_config(config.encoder)
        tower = build_text_tower(config.text)
        projector = build_projector(config.projector, encoder.hidden_size, tower.embed_dim)
        config.projector.in_dim, config.projector.out_dim = encoder.hidden_size, tower.embed_dim
        return cls(config, encoder, tower, projector)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def features(self, images: ImageInput) -> VisionFeatures:
        """PIL images, pixel values (B, 3, H, W) or already computed features -> VisionFeatures."""
        if isinstance(images, VisionFeatures):
            return images.to(self.device)
        if isinstance(images, torch.Tensor):
            return self.encoder(images)
        if isinstance(images, Image.Image):
            images = [images]
        return self.encoder(self.encoder.preprocessing(list(images)))

    def project(
        self, images: ImageInput, with_patches: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Unnormalised (global (B, E), patches (B, N, E) or None) embeddings."""
        features = self.features(images)
        return self.projector(features.to(dtype=_param_dtype(self.projector)), with_patches=with_patches)

    def encode_image(self, images: ImageInput, normalize: bool = True) -> torch.Tensor:
        """Images (or their cached features) -> (B, E) image embeddings in the text space."""
        embedding, _ = self.project(images, with_patches=False)
        return F.normalize(embedding, dim=-1) if normalize else embedding

    def encode_image_patches(self, images: ImageInput, normalize: bool = True) -> torch.Tensor:
        """Images -> (B, h*w, E) per-patch embeddings in the text space (grid from `features().grid_hw`)."""
        _, patches = self.project(images)
        return F.normalize(patches, dim=-1) if normalize else patches

    def encode_text(self, texts: Sequence[str] | str, normalize: bool = True) -> torch.Tensor:
        """Texts -> (T, E) embeddings from the frozen tower."""
        embedding = self.tower.encode([texts] if isinstance(texts, str) else texts).to(self.device)
        return F.normalize(embedding, dim=-1) if normalize else embedding

    @torch.no_grad()
    def similarity(self, images: ImageInput, texts: Sequence[str] | str) -> torch.Tensor:
        """(B images, T texts) cosine similarities."""
        return self.encode_image(images) @ self.encode_text(texts).T

    @torch.no_grad()
    def patch_similarity(self, image: Image.Image, texts: Sequence[str] | str) -> torch.Tensor:
        """(T texts, h, w) cosine of each text with each patch of one image, on the encoder's patch grid.

        The grid covers what the encoder sees (the checkpoint's resize and centre crop); for a map at the
        image's own resolution, with sliding windows, use `bridge.grounding.heatmaps`.
        """
        check_image_size(image, self.encoder.patch_size)
        features = self.features([image])
        _, patches = self.projector(features.to(dtype=_param_dtype(self.projector)))
        cosines = F.normalize(patches[0], dim=-1) @ self.encode_text(texts).T  # (h*w, T)
        return cosines.T.unflatten(1, features.grid_hw)

    def fingerprint(self) -> str:
        """A hash of what decides the embeddings: encoder, tower and projector weights.

        An image index stores it and refuses queries from a bridge with another one.
        """
        # The tower's weights are hashed below; of its config only what changes outputs, not its path.
        text = json.dumps([self.config.text.kind, self.config.text.max_length])
        return fingerprint(nn.ModuleList([self.tower, self.projector]), self.encoder.fingerprint(), text)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = from_dict(BridgeConfig, to_dict(self.config))
        for part, attribute in ((config.encoder, "name"), (config.text, "name"), (config.text, "pretrained")):
            value = getattr(part, attribute)
            if value and Path(value).exists():
                setattr(part, attribute, str(Path(value).resolve()))  # a local path survives a move
        if config.encoder.name is None:
            # A random encoder built from a config exists nowhere else: keep its exact weights.
            self.encoder.save_pretrained(directory / ENCODER_DIR)
            config.encoder.name = ENCODER_DIR
            config.encoder.image_size = None  # the saved preprocessor config already has it
        (directory / CONFIG_FILE).write_text(json.dumps({"bridge": to_dict(config)}, indent=2) + "\n")
        weights = {f"projector.{k}": v.contiguous() for k, v in self.projector.state_dict().items()}
        weights["logit_scale"] = self.logit_scale.detach()
        weights["logit_bias"] = self.logit_bias.detach()
        save_file({k: v.cpu() for k, v in weights.items()}, directory / WEIGHTS_FILE)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> TextBridge:
        directory = Path(directory)
        config_file = directory / CONFIG_FILE
        if not config_file.is_file():
            raise FileNotFoundError(f"'{directory}' is not a saved bridge: it has no {CONFIG_FILE}")
        config = from_dict(BridgeConfig, json.loads(config_file.read_text())["bridge"], str(config_file))
        if config.encoder.name == ENCODER_DIR:
            config.encoder.name = str(directory / ENCODER_DIR)
        bridge = cls.from_config(config)
        bridge.load_weights(directory / WEIGHTS_FILE)
        return bridge

    def load_weights(self, path: str | Path) -> None:
        """Load projector weights, temperature and bias from a safetensors file; never unpickles."""
        weights = read_safetensors(path)
        projector = {
            k.removeprefix("projector."): v for k, v in weights.items() if k.startswith("projector.")
        }
        self.projector.load_state_dict(projector, strict=True)
        with torch.no_grad():
            self.logit_scale.copy_(weights["logit_scale"])
            self.logit_bias.copy_(weights["logit_bias"])


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file; anything else (a pickle included) is refused, never loaded."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file '{path}' does not exist")
    try:
        return load_file(path)
    except (SafetensorError, ValueError, OSError) as error:
        raise ConfigError(
            f"'{path}' is not a safetensors file ({error}); dinobridge never unpickles checkpoints. "
            "Re-save it with safetensors.torch.save_file"
        ) from error


def _param_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype
