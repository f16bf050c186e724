"""The fast encode path: settings chosen for the machine, the encoder run in them, JPEGs decoded on the
encoder's device. Runs on the CPU: torchvision's CPU JPEG decoder stands in for nvJPEG, which shares
its API (`decode_jpeg(..., device=...)`), so every line of the GPU path but the decoder itself is tested.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bridge.decoding import decode_jpegs, gpu_decodable, pixel_batch
from bridge.images import load_image
from bridge.index import ImageIndex
from bridge.model import TextBridge
from bridge.runtime import encode_settings
from bridge.vision import Preprocessing
from tests.conftest import tiny_bridge_config
from tests.test_index import BAD_FILES, GOOD_FILES, by_path, encoded, noise
from training.cache import FeatureCache

NORMALISED_LEVEL = 1 / (255 * 0.225)  # one grey level after ImageNet normalisation


def photo_jpeg(width: int = 420, height: int = 300) -> bytes:
    """A smooth, photo-like JPEG (noise alone would make resampling differences look large)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = 100 + xs[..., None] * 0.3 + ys[..., None] * np.array([0.1, -0.2, 0.3])
    pixels = ramp + np.random.default_rng(0).normal(0, 8, (height, width, 3))
    return encoded(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), "JPEG", quality=90)


def test_settings_on_a_cpu_only_machine() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    settings = encode_settings()
    assert (settings.device.type, settings.dtype, settings.batch_size) == ("cpu", torch.float32, 32)
    assert not settings.gpu_decode and not settings.on_gpu
    assert encode_settings(precision="bf16").dtype == torch.bfloat16
    assert not encode_settings(gpu_decode=True).gpu_decode  # nothing to decode on
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, fp16, int8, got 'int4'"):
        encode_settings(precision="int4")
    with pytest.raises(ValueError, match="device 'cuda' was asked for but torch sees no GPU"):
        encode_settings("cuda")


def test_an_encoder_run_in_bfloat16_keeps_its_fingerprint_and_its_features(tmp_path: Path) -> None:
    bridge = TextBridge.from_config(tiny_bridge_config(width=32, num_heads=2))
    pixels = bridge.encoder.preprocessing([noise((60, 50), seed) for seed in range(4)])
    exact, fingerprint = bridge.encoder(pixels), bridge.fingerprint()
    fp32_cache = FeatureCache(tmp_path, bridge.encoder).directory
    bridge.encoder.run_with(encode_settings(precision="bf16"))
    fast = bridge.encoder(pixels)
    assert fast.patches.dtype == torch.bfloat16 and bridge.fingerprint() == fingerprint
    similarity = torch.nn.functional.cosine_similarity(fast.patches.float(), exact.patches, dim=-1)
    assert similarity.min() > 0.99
    assert FeatureCache(tmp_path, bridge.encoder).directory != fp32_cache  # bf16 features kept apart


@pytest.mark.parametrize("preprocessing", [Preprocessing(224, 256), Preprocessing(112, None)])
def test_tensor_decoding_matches_the_pil_path(preprocessing: Preprocessing) -> None:
    data = photo_jpeg()
    expected = preprocessing([load_image(data)])[0]
    (found,) = decode_jpegs([data], preprocessing, "cpu")
    assert found.shape == expected.shape == (3, preprocessing.image_size, preprocessing.image_size)
    difference = (found - expected).abs()
    # The crop box is rounded to whole pixels and torch's antialiased bicubic is not PIL's to the bit.
    assert difference.mean() < 1.5 * NORMALISED_LEVEL and difference.max() < 10 * NORMALISED_LEVEL


def test_only_jpegs_the_gpu_decodes_exactly_go_there() -> None:
    grey = encoded(Image.fromarray(np.full((8, 8), 90, np.uint8)), "JPEG")
    assert gpu_decodable(photo_jpeg()) and gpu_decodable(grey)
    for name in ("sideways.jpg", "cmyk.jpg", "scan16.png", "logo.png", "frames.gif", "deep/nested/ok.webp"):
        assert not gpu_decodable(GOOD_FILES[name]()), name
    for name, (data, _) in BAD_FILES.items():
        if name != "cut.jpg":  # a cut JPEG's header is fine: the decoder itself has to reject it
            assert not gpu_decodable(data), name
    broken = decode_jpegs([photo_jpeg(), BAD_FILES["cut.jpg"][0]], Preprocessing(112, None), "cpu")
    assert broken[0] is not None and broken[1] is None  # one bad file does not sink the batch


def test_pixel_batch_keeps_the_order_of_mixed_inputs() -> None:
    arrays = [np.full((3, 2, 2), float(i), np.float32) for i in range(4)]
    mixed = [arrays[0], torch.from_numpy(arrays[1]), arrays[2], torch.from_numpy(arrays[3])]
    batch = pixel_batch(mixed, torch.device("cpu"))
    assert batch[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_indexing_with_jpegs_decoded_on_the_encoders_device(tmp_path: Path, tiny_bridge) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("plain.jpg", "sideways.jpg", "cmyk.jpg", "logo.png"):
        (folder / name).write_bytes(GOOD_FILES[name]())
    for seed in range(3):
        (folder / f"photo{seed}.jpg").write_bytes(encoded(noise((64, 48), seed), "JPEG", quality=92))
    (folder / "cut.jpg").write_bytes(BAD_FILES["cut.jpg"][0])
    options = {"workers": 0, "progress": False}
    on_cpu = ImageIndex.build(folder, tiny_bridge, tmp_path / "cpu", gpu_decode=False, **options)
    on_device = ImageIndex.build(folder, tiny_bridge, tmp_path / "device", gpu_decode=True, **options)
    assert on_device.paths == on_cpu.paths and len(on_cpu) == 7
    # The cut JPEG passes the header check, is rejected by the decoder, and the CPU loader words why.
    assert on_device.summary.failed == on_cpu.summary.failed
    assert (on_device.summary.indexed, on_device.summary.unchanged) == (7, 0)
    expected, found = by_path(on_cpu), by_path(on_device)
    for name in ("sideways.jpg", "cmyk.jpg", "logo.png"):  # not for the GPU: decoded exactly as before
        np.testing.assert_array_equal(found[name][1], expected[name][1])
    # Decoded on the device: within resampling rounding of the CPU path, and nearer it than any other image.
    names = list(expected)
    gallery = np.stack([expected[name][0] for name in names]).astype(np.float32)
    for name in ("plain.jpg", "photo0.jpg", "photo1.jpg", "photo2.jpg"):
        query = found[name][0].astype(np.float32)
        assert np.abs(query - expected[name][0]).max() < 0.01, name
        assert names[int(np.argmax(gallery @ query))] == name


def test_a_batch_too_large_for_the_device_is_encoded_in_pieces(
    tiny_bridge, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    encoder = tiny_bridge.encoder
    pixels = encoder.preprocessing([noise((56, 56), seed) for seed in range(8)])
    expected = encoder(pixels)
    real_forward, sizes = encoder.model.forward, []

    def small_card(*args, pixel_values, **kwargs):  # a device that holds 3 images at most
        sizes.append(len(pixel_values))
        if len(pixel_values) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(*args, pixel_values=pixel_values, **kwargs)

    monkeypatch.setattr(encoder.model, "forward", small_card)
    monkeypatch.setattr(encoder, "_fits", None)
    with caplog.at_level("WARNING", logger="bridge.vision"):
        found = encoder(pixels)
        again = encoder(pixels)
    torch.testing.assert_close(found.patches, expected.patches)
    torch.testing.assert_close(again.cls, expected.cls)
    assert sizes == [8, 4, 2, 2, 2, 2] + [2, 2, 2, 2]  # halved until it fitted, then that size from the start
    assert caplog.messages == [
        "a batch of 8 images does not fit in cpu's memory; encoding 4 at a time",
        "a batch of 4 images does not fit in cpu's memory; encoding 2 at a time",
    ]


def test_the_default_device_is_cuda_then_mps_then_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from bridge.cli import build_parser
    from bridge.runtime import default_device

    for cuda, mps, expected in [
        (True, True, "cuda"),
        (True, False, "cuda"),
        (False, True, "mps"),
        (False, False, "cpu"),
    ]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda mps=mps: mps)
        assert default_device() == expected, (cuda, mps)
    # A Mac: its GPU in float16, JPEGs decoded on the CPU (nvJPEG is CUDA's).
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    settings = encode_settings()
    assert (settings.device.type, settings.dtype, settings.batch_size, settings.gpu_decode) == (
        "mps",
        torch.float16,
        64,
        False,
    )
    assert encode_settings("cpu").device.type == "cpu"  # asked for: kept
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device 'mps' was asked for but torch sees no Apple GPU"):
        encode_settings("mps")
    command = ["index", "photos", "--model", "m", "--out", "idx", "--device", "mps"]
    assert build_parser().parse_args(command).device == "mps"
