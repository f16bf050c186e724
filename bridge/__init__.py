"""dinobridge: language on top of a frozen DINOv2, by a small trained projector.

    import bridge

    model = bridge.TextBridge.from_pretrained("demo-out/bridge")
    probabilities = bridge.zero_shot_classify(model, ["cat.jpg", "dog.png"], ["cat", "dog"])

The names below, `__version__` among them, load on first use (PEP 562), so `import bridge` costs
milliseconds and imports neither torch nor transformers; `bridge.TextBridge` imports what the text route
needs, `bridge.VisionLLM` what the LLM route needs. Submodules (`bridge.grounding`, `bridge.index`, ...)
hold the rest.

Not here: training (the `training` package, which imports this one, never the reverse).
"""

from __future__ import annotations

import importlib

# public name -> the module that defines it
_EXPORTS = {
    "TextBridge": "bridge.model",
    "VisionLLM": "bridge.vlm",
    "ImageIndex": "bridge.index",
    "load_image": "bridge.images",
    "ImageLoadError": "bridge.images",
    "heatmaps": "bridge.grounding",
    "segment": "bridge.grounding",
    "zero_shot_classify": "bridge.zeroshot",
    "encode_class_names": "bridge.zeroshot",
    "load_config": "bridge.config",
    "RunConfig": "bridge.config",
    "VLMRunConfig": "bridge.config",
    "BridgeConfig": "bridge.config",
    "export_llava": "bridge.llava_export",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name == "__version__":
        value = _installed_version()
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:
        raise AttributeError(f"module 'bridge' has no attribute {name!r}")
    globals()[name] = value  # later look-ups find it without coming here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def _installed_version() -> str:
    # Asked for on first use too: importing importlib.metadata takes longer than the rest of `import bridge`.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dinobridge")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"
