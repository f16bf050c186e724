"""The frozen vision encoder: DINOv2, DINOv2 with registers and DINOv3, through transformers.

It turns pixels into `VisionFeatures` (CLS, register and patch tokens with the patch grid) and carries
the preprocessing its checkpoint expects. It is frozen for certain: no parameter requires grad, and
`train()` cannot take it out of eval mode, so dropout and drop-path never fire under a projector's
training loop.

Not here: image file loading (images.py) or anything trainable (projectors.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import transformers
from PIL import Image
from torch import nn

from bridge.config import ConfigError, EncoderConfig
from bridge.fingerprint import fingerprint
from bridge.model_files import native_code_only, refuse_custom_code

if TYPE_CHECKING:
    from bridge.runtime import EncodeSettings  # only a type here; runtime imports accelerate

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# model_type -> the name of its transformers class; all three share the [CLS, registers..., patches...]
# layout. Names, not classes: touching a class imports transformers' modeling code (seconds), which only
# building an encoder needs, and a text query never builds one.
ENCODER_CLASSES = {
    "dinov2": "Dinov2Model",
    "dinov2_with_registers": "Dinov2WithRegistersModel",
    "dinov3_vit": "DINOv3ViTModel",
}


@dataclass
class VisionFeatures:
    """Encoder tokens for a batch. Shapes: cls (B, D), registers (B, R, D), patches (B, h*w, D)."""

    cls: torch.Tensor
    registers: torch.Tensor
    patches: torch.Tensor
    grid_hw: tuple[int, int]
    layer: int | None  # None: last layer after the final norm; else a `hidden_states` index

    def to(self, *args, **kwargs) -> VisionFeatures:
        return VisionFeatures(
            self.cls.to(*args, **kwargs),
            self.registers.to(*args, **kwargs),
            self.patches.to(*args, **kwargs),
            self.grid_hw,
            self.layer,
        )

    @staticmethod
    def cat(parts: Sequence[VisionFeatures]) -> VisionFeatures:
        """The batches `parts` (same grid and layer) as one."""
        return VisionFeatures(
            torch.cat([p.cls for p in parts]),
            torch.cat([p.registers for p in parts]),
            torch.cat([p.patches for p in parts]),
            parts[0].grid_hw,
            parts[0].layer,
        )

    def __len__(self) -> int:
        return len(self.cls)

    def __getitem__(self, index) -> VisionFeatures:
        return VisionFeatures(
            self.cls[index], self.registers[index], self.patches[index], self.grid_hw, self.layer
        )


@dataclass(frozen=True)
class Preprocessing:
    """What the checkpoint's image processor does, reduced to the parts that matter for a ViT."""

    image_size: int  # square side fed to the encoder
    # Shortest edge after resizing, before the centre crop (DINOv2: 256 for a 224 crop). None resizes
    # straight to image_size x image_size, as DINOv3's processor does.
    resize_shortest_edge: int | None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def with_image_size(self, image_size: int) -> Preprocessing:
        resize = self.resize_shortest_edge
        if resize is not None:  # keep the checkpoint's resize/crop ratio (256/224 for DINOv2)
            resize = round(resize * image_size / self.image_size)
        return Preprocessing(image_size, resize, self.mean, self.std)

    @property
    def short_side(self) -> int:
        """The shortest side an image needs for this preprocessing to never upsample it: the resize's
        shortest edge (the crop is cut from that), or the square side itself when the image is resized
        straight to it. A decoder may shrink an image this far for free (images.load_image's short_side)."""
        return self.resize_shortest_edge or self.image_size

    def processor_config(self) -> dict:
        """This preprocessing as a transformers BitImageProcessor config (what DINOv2 checkpoints ship)."""
        prep = self
        return {  # resample 3: bicubic, as __call__ resizes
            "image_processor_type": "BitImageProcessor",
            "do_resize": True,
            "do_center_crop": prep.resize_shortest_edge is not None,
            "size": {"shortest_edge": prep.resize_shortest_edge}
            if prep.resize_shortest_edge
            else {"height": prep.image_size, "width": prep.image_size},
            "crop_size": {"height": prep.image_size, "width": prep.image_size},
            "image_mean": list(prep.mean),
            "image_std": list(prep.std),
            "resample": 3,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
        }

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) of the region of a width x height image that becomes the input.

        Resize the shortest edge, then centre-crop, is done as crop-then-resize in the original's pixels,
        so a 10000x3 panorama never becomes an 853,000x256 intermediate.
        """
        if self.resize_shortest_edge is None:
            return (0.0, 0.0, float(width), float(height))
        crop = self.image_size * min(width, height) / self.resize_shortest_edge
        crop_width, crop_height = min(width, crop), min(height, crop)
        left, top = (width - crop_width) / 2, (height - crop_height) / 2
        return (left, top, left + crop_width, top + crop_height)

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """RGB PIL images -> normalised pixel values (B, 3, S, S)."""
        side = self.image_size
        arrays = []
        for image in images:
            box = self.crop_box(*image.size)
            arrays.append(np.asarray(image.resize((side, side), Image.BICUBIC, box=box), dtype=np.float32))
        # numpy, not torch, for this elementwise work: torch's thread pool costs more than it saves here.
        mean = np.asarray(self.mean, dtype=np.float32) * 255
        std = np.asarray(self.std, dtype=np.float32) * 255
        pixels = (np.stack(arrays) - mean) / std
        return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()

    def from_tensor(self, image: torch.Tensor) -> torch.Tensor:
        """One decoded image (3, H, W) uint8, on any device (a GPU's, after nvJPEG) -> (3, S, S) float32.

        The same crop and bicubic resize as `__call__`, in torch (antialiased, as PIL's is), with the box
        rounded to whole pixels: values agree with the PIL path to a few levels in 255.
        """
        left, top, right, bottom = (round(v) for v in self.crop_box(image.shape[2], image.shape[1]))
        region = image[None, :, top:bottom, left:right].float()
        side = self.image_size
        resized = torch.nn.functional.interpolate(
            region, size=(side, side), mode="bicubic", antialias=True, align_corners=False
        ).clamp_(0, 255)[0]
        mean = torch.tensor(self.mean, device=image.device).view(3, 1, 1) * 255
        std = torch.tensor(self.std, device=image.device).view(3, 1, 1) * 255
        return (resized - mean) / std


def check_image_size(image: Image.Image, patch_size: int) -> None:
    """An image with no side as long as one patch holds nothing to map a text onto: say so, not crash."""
    width, height = image.size
    if min(width, height) < patch_size:
        raise ValueError(
            f"image is {width}x{height} pixels, smaller than one {patch_size}-pixel patch of the encoder: "
            f"it holds no patch to ground a text in; use an image at least {patch_size}x{patch_size}"
        )


class FrozenEncoder(nn.Module):
    """A frozen DINOv2/DINOv3 returning `VisionFeatures`. Build with `FrozenEncoder.from_config`."""

    def __init__(self, model: nn.Module, preprocessing: Preprocessing, layer: int | None = None):
        super().__init__()
        self.model = model
        self.preprocessing = preprocessing
        self.layer = layer
        config = model.config
        self.hidden_size: int = config.hidden_size
        self.patch_size: int = config.patch_size
        self.num_registers: int = getattr(config, "num_register_tokens", 0) or 0
        depth = config.num_hidden_layers
        if layer is not None and not -(depth + 1) <= layer <= depth:
            raise ConfigError(
                f"encoder layer {layer} does not exist: hidden_states has {depth + 1} entries "
                f"(0 = embeddings .. {depth}); choose one in [-{depth + 1}, {depth}] or null for the last"
            )
        if preprocessing.image_size % self.patch_size:
            raise ConfigError(
                f"image size {preprocessing.image_size} is not a multiple of the patch size "
                f"{self.patch_size}; use {preprocessing.image_size // self.patch_size * self.patch_size}"
            )
        self.requires_grad_(False)
        self.eval()
        self._fingerprint: str | None = None
        self._fits: int | None = None  # the largest batch known to fit in the device's memory

    @classmethod
    def from_config(cls, config: EncoderConfig) -> FrozenEncoder:
        if config.name is None:
            model, preprocessing = _build_random(config)
        else:
            model, preprocessing = _load_pretrained(config.name)
        if config.image_size is not None:
            preprocessing = preprocessing.with_image_size(config.image_size)
        return cls(model, preprocessing, config.layer)

    def train(self, mode: bool = True) -> FrozenEncoder:
        # Frozen means frozen: a parent module's .train() must not switch on dropout or drop-path here.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def run_with(self, settings: EncodeSettings) -> FrozenEncoder:
        """Move to `settings.device` in `settings.dtype`, compiled if asked (runtime.encode_settings).

        The fingerprint stays that of the weights as loaded: an index built in bfloat16 on a GPU answers
        queries from the same bridge in float32 on a CPU. (The feature cache keys on the dtype as well.)
        """
        self.fingerprint()
        if settings.dtype == torch.qint8:
            self._quantise()
        else:
            self.model.to(settings.device, settings.dtype)
        if settings.compile:
            self.model.compile()  # in place: parameter names, and so saving and fingerprints, unchanged
        return self

    def _quantise(self) -> None:
        """int8 dynamic quantisation of the Linear layers (weights int8, activations quantised per batch),
        on the CPU. Unlike bfloat16 this is another model, not another rounding of the same one, so its
        fingerprint is another: a feature cache never mixes its features with float ones. (An index keys
        on the bridge's fingerprint, saved with the bridge, so `dinobridge index` does not offer int8.)"""
        self.model.to("cpu", torch.float32)
        torch.ao.quantization.quantize_dynamic(self.model, {nn.Linear}, dtype=torch.qint8, inplace=True)
        self._fingerprint = fingerprint(nn.Module(), json.dumps([self._fingerprint, "int8 dynamic Linear"]))

    @property
    def grid_hw(self) -> tuple[int, int]:
        side = self.preprocessing.image_size // self.patch_size
        return (side, side)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> VisionFeatures:
        """pixel_values (B, 3, H, W), H and W multiples of the patch size -> VisionFeatures.

        A batch too large for the device's memory is encoded in halves (and every later batch in pieces
        of the size that fitted), so a large default batch size is safe on any card.
        """
        if self._fits is not None and len(pixel_values) > self._fits:
            return VisionFeatures.cat([self(chunk) for chunk in pixel_values.split(self._fits)])
        try:
            return self._encode_batch(pixel_values)
        except torch.OutOfMemoryError:
            if len(pixel_values) == 1:
                raise
            self._fits = len(pixel_values) // 2
            log.warning(
                "a batch of %d images does not fit in %s's memory; encoding %d at a time",
                len(pixel_values),
                self.device,
                self._fits,
            )
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return self(pixel_values)

    def _encode_batch(self, pixel_values: torch.Tensor) -> VisionFeatures:
        height, width = pixel_values.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"pixel size {height}x{width} is not a multiple of the patch size {self.patch_size}"
            )
        # non_blocking: a pinned batch copies to the GPU while the previous one is still encoding.
        pixel_values = pixel_values.to(self.device, self.dtype, non_blocking=True)
        if self.layer is None:
            tokens = self.model(pixel_values=pixel_values).last_hidden_state
        else:
            outputs = self.model(pixel_values=pixel_values, output_hidden_states=True)
            tokens = outputs.hidden_states[self.layer]
        prefix = 1 + self.num_registers
        return VisionFeatures(
            cls=tokens[:, 0],
            registers=tokens[:, 1:prefix],
            patches=tokens[:, prefix:],
            grid_hw=(height // self.patch_size, width // self.patch_size),
            layer=self.layer,
        )

    def encode(self, images: Sequence[Image.Image], batch_size: int = 64) -> VisionFeatures:
        """RGB PIL images -> VisionFeatures on the CPU, in batches."""
        return VisionFeatures.cat(
            [
                self(self.preprocessing(images[i : i + batch_size])).to("cpu")
                for i in range(0, len(images), batch_size)
            ]
        )

    def fingerprint(self) -> str:
        """A hash of everything that changes the features: class, config, weights, layer, preprocessing.

        Keys the feature cache and the image index, so features of two encoders never mix.
        """
        if self._fingerprint is None:
            # Only what changes the features: save_pretrained adds `architectures` and `dtype` to the
            # config and the transformers version is no property of the model, so none of them count
            # (the parameters' dtype does), or a reloaded encoder would not match itself.
            config = self.model.config.to_diff_dict()
            for key in ("architectures", "dtype", "torch_dtype", "transformers_version", "_name_or_path"):
                config.pop(key, None)
            dtype = str(self.dtype)
            settings = json.dumps([config, self.layer, asdict(self.preprocessing), dtype], sort_keys=True)
            self._fingerprint = fingerprint(self.model, settings)
        return self._fingerprint

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the encoder in transformers' format, with a preprocessor_config.json that reloads it."""
        directory = Path(directory)
        self.model.save_pretrained(directory)
        processor = self.preprocessing.processor_config()
        (directory / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))


def _build_random(config: EncoderConfig) -> tuple[nn.Module, Preprocessing]:
    architecture = dict(config.architecture)
    model_type = architecture.pop("model_type", "dinov2")
    model_class = _encoder_class(model_type, "encoder.architecture.model_type")
    torch.manual_seed(config.seed)
    model = model_class(model_class.config_class(**architecture))
    size = model.config.image_size
    return model, Preprocessing(image_size=size, resize_shortest_edge=None)


def _load_pretrained(name: str) -> tuple[nn.Module, Preprocessing]:
    with native_code_only(name):
        model_config = transformers.AutoConfig.from_pretrained(name, trust_remote_code=False)
        model_class = _encoder_class(model_config.model_type, f"the encoder '{name}'")
        model = model_class.from_pretrained(name, attn_implementation="sdpa", trust_remote_code=False)
        return model, _checkpoint_preprocessing(name, model.config)


def _encoder_class(model_type: str, what: str) -> type:
    if model_type not in ENCODER_CLASSES:
        raise ConfigError(
            f"{what} is a '{model_type}' model; dinobridge encoders are {', '.join(ENCODER_CLASSES)}"
        )
    return getattr(transformers, ENCODER_CLASSES[model_type])


def _checkpoint_preprocessing(name: str, model_config) -> Preprocessing:
    """Read the checkpoint's preprocessor_config.json; fall back to ImageNet stats at its image size."""
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(name, trust_remote_code=False)
    except (OSError, ValueError):
        refuse_custom_code(name)  # a processor that needs custom code is refused, not replaced by defaults
        log.warning("'%s' has no preprocessor_config.json; using ImageNet mean/std", name)
        return Preprocessing(image_size=model_config.image_size, resize_shortest_edge=None)
    size, crop = getattr(processor, "size", None) or {}, getattr(processor, "crop_size", None) or {}
    size, crop = dict(size), dict(crop)
    mean = tuple(getattr(processor, "image_mean", None) or IMAGENET_MEAN)
    std = tuple(getattr(processor, "image_std", None) or IMAGENET_STD)
    if getattr(processor, "do_center_crop", False) and crop:
        return Preprocessing(crop["height"], size.get("shortest_edge", crop["height"]), mean, std)
    side = size.get("height") or size.get("shortest_edge") or model_config.image_size
    return Preprocessing(side, None, mean, std)
