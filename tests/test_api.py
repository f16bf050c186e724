"""The front door (bridge/__init__.py): what `import bridge` costs, what it exports, its version."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

import bridge
from bridge.cli import main

ROOT = Path(__file__).resolve().parents[1]


def modules_after(statement: str) -> set[str]:
    """The modules a fresh interpreter holds after running `statement`."""
    code = f"import json, sys; {statement}; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return set(json.loads(result.stdout.splitlines()[-1]))


def test_import_bridge_loads_neither_torch_nor_matplotlib():
    modules = modules_after("import bridge")
    assert not {"torch", "transformers", "matplotlib", "numpy"} & modules
    # A name loads its own module on first use, and only what that module needs.
    modules = modules_after("import bridge; bridge.load_config")
    assert "bridge.config" in modules and "torch" not in modules


def test_import_bridge_model_does_not_load_matplotlib_or_an_encoder_class():
    modules = modules_after("import bridge.model")
    assert "matplotlib" not in modules
    assert not any("modeling_dinov" in name for name in modules)  # transformers' encoder code


def test_every_public_name_is_the_object_its_module_defines():
    assert set(bridge.__all__) >= {
        "TextBridge",
        "VisionLLM",
        "ImageIndex",
        "load_image",
        "heatmaps",
        "segment",
        "zero_shot_classify",
        "encode_class_names",
        "load_config",
        "RunConfig",
        "VLMRunConfig",
        "BridgeConfig",
        "export_llava",
    }
    for name, module in bridge._EXPORTS.items():
        assert getattr(bridge, name) is getattr(importlib.import_module(module), name)
    assert set(bridge.__all__) <= set(dir(bridge))
    with pytest.raises(AttributeError, match="module 'bridge' has no attribute 'TextBrigde'"):
        bridge.TextBrigde  # noqa: B018


def test_version_is_the_installed_distributions_and_the_cli_prints_it(capsys):
    assert bridge.__version__ == importlib.metadata.version("dinobridge")
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out == f"dinobridge {bridge.__version__}\n"
