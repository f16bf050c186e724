"""Shared fixtures: tiny models built from configs, so every test runs offline in seconds."""

from __future__ import annotations

import pytest

from bridge.config import BridgeConfig, EncoderConfig, ProjectorConfig

# A DINOv2 small enough that a test encodes dozens of images in well under a second.
TINY_DINOV2 = {
    "model_type": "dinov2",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "patch_size": 14,
    "image_size": 56,
}


def tiny_bridge_config(projector: str = "attention", **options) -> BridgeConfig:
    """The offline default's text tower (real MiniLM) with a tiny random DINOv2."""
    return BridgeConfig(
        encoder=EncoderConfig(architecture=dict(TINY_DINOV2)),
        projector=ProjectorConfig(kind=projector, options=options),
    )


@pytest.fixture(scope="session")
def tiny_bridge():
    from bridge.model import TextBridge

    return TextBridge.from_config(tiny_bridge_config(width=32, num_heads=2))


def stop_text_training_at(monkeypatch: pytest.MonkeyPatch, step: int):
    """Make text-route training stop as Ctrl-C would when it draws the batch of `step` (counted from 1);
    returns the real batch sampler, for the test to put back before it resumes."""
    import training.align

    real = training.align.sample_batch

    def stops(data, config, batch):
        if batch == step - 1:
            raise KeyboardInterrupt
        return real(data, config, batch)

    monkeypatch.setattr(training.align, "sample_batch", stops)
    return real
