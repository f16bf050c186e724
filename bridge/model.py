"""TextBridge: a frozen encoder, a trained projector and a frozen text tower in one shared space.

The user-facing model of the text route: `encode_images` / `encode_texts` (batched inference, numpy
out), `encode_image` / `encode_text` (tensors that keep gradients, for training), `similarity`,
per-patch embeddings, and `save_pretrained` / `from_pretrained`. A saved bridge is a directory with
`config.json` (its kind and format version, what the encoder and tower are, by hub name or absolute local
path, and the bridge's fingerprint), the trained weights in `model.safetensors` (a few MB), and `encoder/`
only when the encoder was built from a config and so exists nowhere else. Nothing is ever unpickled, and
no model folder's own Python code is ever run.

Not here: training (training/align.py) or the image index (index.py).
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from bridge.adapters import DEFAULT_ADAPTER, Adapters, attach, merged
from bridge.config import AdapterSettings, BridgeConfig, ConfigError, ProjectorConfig, from_dict, to_dict
from bridge.fingerprint import fingerprint
from bridge.hub import local_directory, push_model
from bridge.images import load_image
from bridge.model_files import CONFIG_FILE, TEXT_BRIDGE, read_saved_config, refuse_custom_code, saved_header
from bridge.projectors import build_projector, check_widths
from bridge.text import TextTower, build_text_tower
from bridge.vision import FrozenEncoder, VisionFeatures, check_image_size

WEIGHTS_FILE = "model.safetensors"
ENCODER_DIR = "encoder"  # where an encoder built from a config is saved inside a bridge
# CLIP caps its learned temperature at 100 so the logits cannot blow up early in training; the losses cap
# it, and so does every use of the scale outside training (zero-shot probabilities).
MAX_LOGIT_SCALE = 100.0

ImageInput = Sequence[Image.Image] | torch.Tensor | VisionFeatures
ImageSource = str | os.PathLike | Image.Image  # what `encode_images` takes, mixed freely


class TextBridge(nn.Module):
    """Frozen encoder -> trained projector -> the frozen text tower's embedding space.

    `encoder` None builds it from `config.encoder` on first use (see `encoder`).
    """

    def __init__(
        self, config: BridgeConfig, encoder: FrozenEncoder | None, tower: TextTower, projector: nn.Module
    ):
        super().__init__()
        self.config = config
        if encoder is not None:
            self._modules["encoder"] = encoder  # as `self.encoder = encoder` would, past the property
        self.tower = tower
        self.projector = projector
        # Learnable temperature (CLIP's 1/0.07 start) and bias (SigLIP's -10 start); each loss uses its own.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))
        # (fingerprint, the projector's own fingerprint when it was taken): see `fingerprint`.
        self._fingerprint: tuple[str, str] | None = None
        self.adapters: Adapters | None = None  # LoRA adapters (bridge/adapters.py), made on first add

    @classmethod
    def from_config(cls, config: BridgeConfig) -> TextBridge:
        """A new bridge with an untrained projector. Width mismatches fail before weights are built.

        `config` is copied, never changed: the widths found in the encoder and the tower go into the
        bridge's own `config`.
        """
        config = copy.deepcopy(config)
        encoder = FrozenEncoder.from_config(config.encoder)
        return cls._assemble(config, encoder, encoder.hidden_size)

    @classmethod
    def _assemble(cls, config: BridgeConfig, encoder: FrozenEncoder | None, in_dim: int) -> TextBridge:
        """The bridge of `config` (which it keeps and fills in) around `encoder`, whose width is in_dim."""
        tower = build_text_tower(config.text)
        projector = build_projector(config.projector, in_dim, tower.embed_dim)
        config.projector.in_dim, config.projector.out_dim = in_dim, tower.embed_dim
        return cls(config, encoder, tower, projector)

    @property
    def encoder(self) -> FrozenEncoder:
        """The frozen encoder. A bridge from `from_pretrained` builds it here, on first use: a text query
        never runs it, and loading a real DINOv2 takes seconds."""
        if "encoder" not in self._modules:
            encoder = FrozenEncoder.from_config(self.config.encoder)
            check_widths(self.config.projector, encoder.hidden_size, self.tower.embed_dim)
            # Where and in what dtype `.to()` would have put it, had it existed then.
            self._modules["encoder"] = encoder.to(self.logit_scale.device, self.logit_scale.dtype)
        return self._modules["encoder"]

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
        """One batch of RGB PIL images, pixel values or cached features -> (B, E) image embeddings in the
        text space, on the bridge's device.

        The training-side call: the result keeps its gradient and the projector its mode (dropout on
        while training). To embed files or many images, use `encode_images`.
        """
        embedding, _ = self.project(images, with_patches=False)
        return F.normalize(embedding, dim=-1) if normalize else embedding

    def encode_images(
        self,
        images: Sequence[ImageSource] | VisionFeatures,
        batch_size: int = 32,
        convert_to_numpy: bool = True,
        normalize: bool = True,
        progress: bool = False,
    ) -> np.ndarray | torch.Tensor:
        """Images -> (N, E) float32 embeddings in the text space, as sentence-transformers' `encode`.

        images: file paths and PIL images, mixed, or features the encoder already computed. Each image
        goes through `bridge.images.load_image`, so a file that cannot be read raises its `ImageLoadError`
        naming it. Runs `batch_size` images at a time, without autograd and with the projector in eval
        mode (restored after); returns numpy, or with convert_to_numpy=False a tensor on the CPU.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if isinstance(images, str | os.PathLike | Image.Image):
            images = [images]
        parts = [torch.zeros(0, self.tower.embed_dim)]
        training = self.projector.training
        self.projector.eval()
        try:
            # no_grad, not inference_mode: a returned tensor may meet autograd later (say, as a fixed
            # target), which inference tensors refuse.
            with torch.no_grad():
                starts = range(0, len(images), batch_size)
                for start in tqdm(starts, desc="encoding images", unit="batch", disable=not progress):
                    batch = images[start : start + batch_size]
                    if not isinstance(batch, VisionFeatures):
                        batch = [load_image(image) for image in batch]
                    parts.append(self.encode_image(batch, normalize).float().cpu())
        finally:
            self.projector.train(training)
        embeddings = torch.cat(parts)
        return embeddings.numpy() if convert_to_numpy else embeddings

    def encode_image_patches(self, images: ImageInput, normalize: bool = True) -> torch.Tensor:
        """Images -> (B, h*w, E) per-patch embeddings in the text space (grid from `features().grid_hw`)."""
        _, patches = self.project(images)
        return F.normalize(patches, dim=-1) if normalize else patches

    def encode_text(self, texts: Sequence[str] | str, normalize: bool = True) -> torch.Tensor:
        """Texts -> (T, E) embeddings from the frozen tower, a tensor on the bridge's device (the tower is
        frozen, so it never carries a gradient). `encode_texts` is the same, numpy out."""
        embedding = self.tower.encode([texts] if isinstance(texts, str) else texts).to(self.device)
        return F.normalize(embedding, dim=-1) if normalize else embedding

    def encode_texts(
        self,
        texts: Sequence[str] | str,
        batch_size: int = 64,
        convert_to_numpy: bool = True,
        normalize: bool = True,
    ) -> np.ndarray | torch.Tensor:
        """Texts -> (T, E) float32 embeddings, as sentence-transformers' `encode`: `batch_size` texts of
        similar length at a time; numpy, or with convert_to_numpy=False a tensor on the CPU."""
        embeddings = self.tower.encode([texts] if isinstance(texts, str) else list(texts), batch_size)
        embeddings = F.normalize(embeddings, dim=-1) if normalize else embeddings
        return embeddings.numpy() if convert_to_numpy else embeddings

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

        An image index stores it and refuses queries from a bridge with another one. Hashing a real
        encoder and tower takes seconds, and both are frozen, so the value is kept and only the
        projector, the part that trains (a few MB, milliseconds), is hashed again on each call: a changed
        projector (an optimiser step, `load_weights`) means a new fingerprint. A bridge from
        `from_pretrained` starts with the value saved with it, which spares it the hashing and the
        building of its encoder. With an adapter loaded, see `Adapters.fingerprint`.
        """
        if self.adapters is not None:
            return self.adapters.fingerprint()
        projector = fingerprint(self.projector)
        if self._fingerprint is None or self._fingerprint[1] != projector:
            # The tower's weights are hashed below; of its config only what changes outputs, not its path.
            text = json.dumps([self.config.text.kind, self.config.text.max_length])
            modules = nn.ModuleList([self.tower, self.projector])
            self._fingerprint = (fingerprint(modules, self.encoder.fingerprint(), text), projector)
        return self._fingerprint[0]

    def add_adapter(self, name: str = DEFAULT_ADAPTER, settings: AdapterSettings | None = None) -> None:
        """A new LoRA adapter on this bridge (bridge/adapters.py), active and zero (the base's embeddings)
        until it trains; the base weights are frozen."""
        attach(self).add(name, settings or AdapterSettings())

    def set_adapter(self, name: str | None) -> None:
        """Embed through adapter `name`, or through the base alone (None), bit for bit the base's."""
        if name is not None or self.adapters is not None:
            attach(self).set_active(name)

    @property
    def adapter(self) -> str | None:
        """The name of the active adapter; None: the base."""
        return None if self.adapters is None else self.adapters.active

    def merged(self) -> TextBridge:
        """A plain bridge with the active adapter folded into the projector (loads without peft)."""
        return merged(self)

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
        # The fingerprint is saved with the projector's own, so a load can tell it is still these weights'.
        saved = {**saved_header(TEXT_BRIDGE), "bridge": to_dict(config)}
        if self.adapters is None:
            saved["fingerprint"] = self.fingerprint()
            saved["projector_fingerprint"] = self._fingerprint[1]
            projector, temperature = self.projector.state_dict(), (self.logit_scale, self.logit_bias)
        else:  # the base as it was, unchanged, and each adapter in its folder (adapters.py)
            saved["fingerprint"] = self.adapters.base_fingerprint
            saved["projector_fingerprint"] = self.adapters.base_projector_fingerprint
            projector, temperature = self.adapters.base_weights(), self.adapters.temperatures[None]
            self.adapters.save(directory)
        (directory / CONFIG_FILE).write_text(json.dumps(saved, indent=2) + "\n")
        weights = {f"projector.{k}": v.contiguous() for k, v in projector.items()}
        weights["logit_scale"] = temperature[0].detach()
        weights["logit_bias"] = temperature[1].detach()
        save_file({k: v.cpu() for k, v in weights.items()}, directory / WEIGHTS_FILE)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, adapter: str | None = None, *, revision: str | None = None
    ) -> TextBridge:
        """The bridge `save_pretrained` wrote to `directory`, or pushed to the Hub repo id `directory` (at
        `revision`; through huggingface_hub's cache, bridge/hub.py). What it cannot load (another kind of
        model, a newer format, a damaged or mismatched file, a model needing custom code) is refused in one
        line naming the file and the fix, before any weights are read.

        `adapter`: the name of a LoRA adapter saved with it (bridge/adapters.py), loaded and active;
        None: the base bridge alone."""
        directory = local_directory(directory, revision)
        saved = read_saved_config(directory, TEXT_BRIDGE)
        config_file = directory / CONFIG_FILE
        config = from_dict(BridgeConfig, saved["bridge"], str(config_file))
        if config.encoder.name == ENCODER_DIR:
            config.encoder.name = saved_part(directory, ENCODER_DIR, "encoder")
        if config.encoder.name is not None:
            # The encoder is built on first use; a folder that would run code is refused now.
            refuse_custom_code(config.encoder.name)
        # The saved widths let the projector be built now and the encoder on first use (`encoder`); only a
        # config without them (written by hand) needs the encoder to tell its width.
        encoder = None if config.projector.in_dim else FrozenEncoder.from_config(config.encoder)
        try:
            bridge = cls._assemble(config, encoder, config.projector.in_dim or encoder.hidden_size)
        except ConfigError as error:
            raise ConfigError(f"'{config_file}' describes a bridge that cannot be built: {error}") from None
        bridge.load_weights(directory / WEIGHTS_FILE, config_file)
        # The saved fingerprint stands for these weights if the projector is still the one it was saved
        # with (a weights file copied in from another run is not); bridges saved before it was kept, or
        # whose file does not match, compute theirs.
        projector = fingerprint(bridge.projector)
        if saved.get("fingerprint") and saved.get("projector_fingerprint") == projector:
            bridge._fingerprint = (saved["fingerprint"], projector)
        if adapter is not None:
            attach(bridge).load(directory, adapter)
        return bridge

    def push_to_hub(self, repo_id: str, private: bool = False, revision: str | None = None, **options) -> str:
        """Upload this bridge to the Hub repo `repo_id` with a model card; returns the commit's URL.
        `dinobridge push DIR` pushes a training run's directory, with its record (bridge/hub.py)."""
        return push_model(self, repo_id, private=private, revision=revision, **options)

    def load_weights(self, path: str | Path, config_file: Path | None = None) -> None:
        """Load projector weights, temperature and bias from a safetensors file; never unpickles.

        `config_file`, when the weights come with one, is named if they do not fit the projector it
        describes."""
        weights = read_safetensors(path)
        load_projector_weights(
            self.projector, self.config.projector, weights, path, config_file, ("logit_scale", "logit_bias")
        )
        with torch.no_grad():
            self.logit_scale.copy_(weights["logit_scale"])
            self.logit_bias.copy_(weights["logit_bias"])


def saved_part(directory: Path, folder: str, what: str) -> str:
    """The path of a part a model saved inside its own directory (an encoder or LLM built from a config,
    which exists nowhere else), refused in one line when it is not there."""
    path = directory / folder
    if not (path / CONFIG_FILE).is_file():
        state = "has no config.json" if path.is_dir() else "is missing"
        raise ConfigError(
            f"'{path}' {state}: this {what} was built from a config and saved only there; copy the whole "
            f"directory the model was saved to, {folder}/ included, or save the model again"
        )
    return str(path)


def load_projector_weights(
    projector: nn.Module,
    config: ProjectorConfig,
    weights: dict[str, torch.Tensor],
    weights_file: str | Path,
    config_file: Path | None = None,
    also: Sequence[str] = (),
) -> None:
    """Load the "projector."-prefixed tensors of `weights` into `projector`, after checking that they are
    its weights (names and shapes) and that the keys `also` are there, so a mismatch reads as one line
    naming the files and the fix, not as torch's dump of two state dicts."""
    expected = {k: tuple(v.shape) for k, v in projector.state_dict().items()}
    given = {k.removeprefix("projector."): v for k, v in weights.items() if k.startswith("projector.")}
    problems = [f"no projector.{k}" for k in expected if k not in given]
    problems += [f"no {k}" for k in also if k not in weights]
    problems += [f"projector.{k}, which it has no place for" for k in given if k not in expected]
    problems += [
        f"projector.{k} of shape {tuple(v.shape)} where {expected[k]} is expected"
        for k, v in given.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    if problems:
        options = "".join(f", {key}={value}" for key, value in config.options.items())
        described = f"a '{config.kind}' projector ({config.in_dim} -> {config.out_dim}{options})"
        found = f"{problems[0]}{f' and {len(problems) - 1} more differences' if len(problems) > 1 else ''}"
        if config_file is not None:
            raise ConfigError(
                f"'{config_file}' names {described} but '{weights_file}' holds another one's weights "
                f"({found}): restore the 'projector' section of {config_file.name} as it was saved with "
                "these weights, or save the model again"
            )
        raise ConfigError(
            f"'{weights_file}' holds the weights of another projector than this model's, {described} "
            f"({found}); load weights saved from a model with the same projector settings"
        )
    projector.load_state_dict(given, strict=True)


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
