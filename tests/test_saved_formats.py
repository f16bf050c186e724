"""Saved bridges and VisionLLMs: their kind and format version, the one-line refusals of what cannot be
loaded (the other kind, a newer format, damaged or mismatched files, a missing part), and models that
need their own Python code, refused without a prompt even in a terminal, their code never run.

The models are the tiny ones of conftest.py and test_vlm.py, saved in tmp_path; files are damaged here.
"""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from bridge.cli import main as dinobridge
from bridge.config import ConfigError, EncoderConfig, LLMConfig, TextConfig
from bridge.model import TextBridge
from bridge.model_files import FORMAT_VERSION, TEXT_BRIDGE, VISION_LLM
from bridge.text import build_text_tower
from bridge.vision import FrozenEncoder
from bridge.vlm import VisionLLM, load_llm
from tests.test_vlm import tiny_vlm

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["a red circle", "a blue square"]

# Python a model folder ships for transformers to import: were it ever imported, the marker would exist.
CUSTOM_CODE = """
import pathlib
pathlib.Path({marker!r}).write_text("custom code ran")

from transformers import Dinov2Config, Dinov2Model


class CustomConfig(Dinov2Config):
    model_type = "custom_dinov2"


class CustomModel(Dinov2Model):
    config_class = CustomConfig
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_bridge) -> dict[str, Path]:
    """A saved tiny bridge and a saved tiny VisionLLM, never changed: tests copy them to damage them."""
    root = tmp_path_factory.mktemp("saved")
    tiny_bridge.save_pretrained(root / "bridge")
    tiny_vlm().save_pretrained(root / "vlm")
    return {"bridge": root / "bridge", "vlm": root / "vlm"}


def copy_of(directory: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(directory, tmp_path / directory.name))


def edit_config(directory: Path, edit) -> None:
    config_file = directory / "config.json"
    saved = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(edit(saved)))


def refusal(load, *args) -> str:
    """The message of the ConfigError or FileNotFoundError `load(*args)` raises; one line."""
    with pytest.raises((ConfigError, FileNotFoundError)) as caught:
        load(*args)
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- kind and format version -----------------------------------------------------------------------------


def test_saved_models_carry_their_kind_and_format_version_and_load_back(saved, tiny_bridge) -> None:
    bridge_config = json.loads((saved["bridge"] / "config.json").read_text())
    vlm_config = json.loads((saved["vlm"] / "config.json").read_text())
    assert (bridge_config["kind"], bridge_config["format_version"]) == ("dinobridge-text-bridge", 1)
    assert (vlm_config["kind"], vlm_config["format_version"]) == ("dinobridge-vision-llm", 1)
    assert (TEXT_BRIDGE, VISION_LLM, FORMAT_VERSION) == ("dinobridge-text-bridge", "dinobridge-vision-llm", 1)

    loaded = TextBridge.from_pretrained(saved["bridge"])
    assert loaded.fingerprint() == tiny_bridge.fingerprint()
    model = VisionLLM.from_pretrained(saved["vlm"])
    original = tiny_vlm()
    for mine, theirs in zip(model.projector.parameters(), original.projector.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs)


def test_one_kind_given_where_the_other_is_expected_says_what_it_is_and_where_it_goes(saved) -> None:
    message = refusal(TextBridge.from_pretrained, saved["vlm"])
    assert f"'{saved['vlm']}' is a saved VisionLLM, but a TextBridge is expected here" in message
    assert "VisionLLM.from_pretrained" in message and "dinobridge train saves one" in message

    message = refusal(VisionLLM.from_pretrained, saved["bridge"])
    assert f"'{saved['bridge']}' is a saved TextBridge, but a VisionLLM is expected here" in message
    assert "dinobridge train-vlm saves one" in message


def test_files_saved_before_kinds_were_written_still_load_and_are_still_told_apart(
    saved, tiny_bridge, tmp_path
) -> None:
    bridge, vlm = copy_of(saved["bridge"], tmp_path), copy_of(saved["vlm"], tmp_path)
    for directory in (bridge, vlm):
        edit_config(directory, lambda c: {k: v for k, v in c.items() if k not in ("kind", "format_version")})
    assert TextBridge.from_pretrained(bridge).fingerprint() == tiny_bridge.fingerprint()
    assert VisionLLM.from_pretrained(vlm).tokens_per_image() == 16
    assert "is a saved VisionLLM, but a TextBridge is expected" in refusal(TextBridge.from_pretrained, vlm)
    assert "is a saved TextBridge, but a VisionLLM is expected" in refusal(VisionLLM.from_pretrained, bridge)


@pytest.mark.parametrize("kind", ["bridge", "vlm"])
def test_a_newer_format_is_refused_saying_which_this_dinobridge_reads(saved, tmp_path, kind) -> None:
    directory = copy_of(saved[kind], tmp_path)
    edit_config(directory, lambda c: {**c, "format_version": 2})
    load = TextBridge.from_pretrained if kind == "bridge" else VisionLLM.from_pretrained
    message = refusal(load, directory)
    assert f"'{directory}' was saved in format version 2 by a newer dinobridge" in message
    assert "reads format version 1" in message and "upgrade dinobridge" in message


# --- damaged or mismatched files -------------------------------------------------------------------------

DAMAGED_CONFIGS = {
    "not JSON": ("{half", "config.json' is not JSON (Expecting property name"),
    "a list": ("[1, 2]", "config.json' holds a JSON list, not an object"),
    "no bridge section": ('{"other": 1}', "config.json' has no 'bridge' section"),
    "a section-less kind": ('{"kind": "dinobridge-text-bridge"}', "config.json' has no 'bridge' section"),
    "an unknown kind": ('{"kind": "a-teapot", "bridge": {}}', "config.json' says it is a 'a-teapot'"),
    "an odd version": ('{"format_version": "one", "bridge": {}}', "has format_version 'one'"),
    "a transformers checkpoint": ('{"model_type": "llava"}', "is a transformers 'llava' checkpoint"),
    "not text": (b"\xff\xfe\x00bridge", "config.json' is not text"),
}


@pytest.mark.parametrize("case", DAMAGED_CONFIGS)
def test_a_damaged_config_is_refused_in_one_line_naming_the_file(saved, tmp_path, case) -> None:
    content, expected = DAMAGED_CONFIGS[case]
    directory = copy_of(saved["bridge"], tmp_path)
    config_file = directory / "config.json"
    config_file.write_bytes(content if isinstance(content, bytes) else content.encode())
    message = refusal(TextBridge.from_pretrained, directory)
    assert expected in message and str(directory) in message


def test_a_missing_config_or_directory_is_named(saved, tmp_path) -> None:
    directory = copy_of(saved["bridge"], tmp_path)
    (directory / "config.json").unlink()
    assert f"'{directory}' is not a saved TextBridge: it has no config.json" in refusal(
        TextBridge.from_pretrained, directory
    )
    assert "there is no such directory" in refusal(VisionLLM.from_pretrained, tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda p: p.update(kind="linear", options={}), "names a 'linear' projector (32 -> 384)"),
        (lambda p: p["options"].update(width=16, num_heads=2), "of shape"),
    ],
    ids=["another kind", "another width"],
)
def test_a_config_naming_another_projector_than_the_weights_is_one_line_naming_both_files(
    saved, tmp_path, edit, expected
) -> None:
    directory = copy_of(saved["bridge"], tmp_path)
    edit_config(directory, lambda c: (edit(c["bridge"]["projector"]), c)[1])
    message = refusal(TextBridge.from_pretrained, directory)
    assert expected in message
    assert (
        f"'{directory / 'config.json'}' names" in message
        and f"'{directory / 'model.safetensors'}'" in message
    )
    assert "restore the 'projector' section of config.json" in message


def test_a_vision_llm_whose_weights_belong_to_another_projector_names_both_files(saved, tmp_path) -> None:
    directory = copy_of(saved["vlm"], tmp_path)
    edit_config(directory, lambda c: (c["vlm"]["projector"]["options"].update(hidden_dim=8), c)[1])
    message = refusal(VisionLLM.from_pretrained, directory)
    assert "names a 'mlp' projector (32 -> 48, hidden_dim=8)" in message and "model.safetensors" in message


@pytest.mark.parametrize(("kind", "part"), [("bridge", "encoder"), ("vlm", "encoder"), ("vlm", "llm")])
def test_a_missing_saved_part_is_named_with_the_fix(saved, tmp_path, kind, part) -> None:
    directory = copy_of(saved[kind], tmp_path)
    shutil.rmtree(directory / part)
    load = TextBridge.from_pretrained if kind == "bridge" else VisionLLM.from_pretrained
    message = refusal(load, directory)
    assert f"'{directory / part}' is missing" in message and f"{part}/ included" in message


def test_the_cli_says_in_one_line_that_a_vision_llm_is_no_bridge(saved, tmp_path, capsys) -> None:
    Image.new("RGB", (56, 56), "red").save(tmp_path / "red.png")
    commands = [
        ["search", str(tmp_path / "no-index"), "a red circle", "--model", str(saved["vlm"])],
        ["ground", str(tmp_path / "red.png"), "a red circle", "--model", str(saved["vlm"])],
        ["chat", "what is this?", "--model", str(saved["bridge"])],
    ]
    for command in commands:
        assert dinobridge(command) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "expected here" in error, error


# --- no remote code ----------------------------------------------------------------------------------------


def ship_custom_code(folder: Path, marker: Path, classes: dict[str, str]) -> None:
    """Make `folder` a model folder that asks transformers to import its own module: its model type is
    one transformers does not know (for a type it knows, transformers ignores the auto_map)."""
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    config["model_type"] = "custom_dinov2"
    config["auto_map"] = {auto: f"custom_model.{name}" for auto, name in classes.items()}
    config_file.write_text(json.dumps(config))
    (folder / "custom_model.py").write_text(CUSTOM_CODE.format(marker=str(marker)))


@pytest.fixture
def custom_code_bridge(saved, tmp_path) -> tuple[Path, Path]:
    """A saved bridge whose encoder/ asks for its own code, and where that code would leave its mark."""
    directory, marker = copy_of(saved["bridge"], tmp_path), tmp_path / "custom-code-ran"
    ship_custom_code(
        directory / "encoder", marker, {"AutoConfig": "CustomConfig", "AutoModel": "CustomModel"}
    )
    return directory, marker


def test_a_model_needing_custom_code_is_refused_with_the_reason_and_its_code_never_runs(
    custom_code_bridge, tmp_path
) -> None:
    directory, marker = custom_code_bridge
    encoder = directory / "encoder"
    reason = (
        "needs custom Python code (auto_map in config.json); dinobridge never runs code from a model "
        "folder. Use a model transformers supports natively"
    )
    assert f"'{encoder}' {reason}" in refusal(TextBridge.from_pretrained, directory)
    assert f"'{encoder}' {reason}" in refusal(FrozenEncoder.from_config, EncoderConfig(name=str(encoder)))

    for folder in (tmp_path / "tower", tmp_path / "llm"):
        folder.mkdir()
        ship_custom_code(folder, marker, {"AutoConfig": "CustomConfig", "AutoModel": "CustomModel"})
    assert reason in refusal(build_text_tower, TextConfig(name=str(tmp_path / "tower")))
    assert reason in refusal(load_llm, LLMConfig(name=str(tmp_path / "llm")))
    assert not marker.exists()


def run_in_a_terminal(command: list[str], typed: str, timeout: float = 180) -> tuple[int, str]:
    """Run `command` with a pseudo-terminal as stdin, stdout and stderr, `typed` already typed in (as a
    user who answers yes to any question would); its exit status and everything it wrote."""
    leader, follower = pty.openpty()
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with subprocess.Popen(
        command, stdin=follower, stdout=follower, stderr=follower, env=environment, start_new_session=True
    ) as child:
        os.close(follower)
        os.write(leader, typed.encode())
        output, deadline = b"", time.monotonic() + timeout
        while time.monotonic() < deadline:
            if select.select([leader], [], [], 0.1)[0]:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # the terminal's other side closed: the child is gone
                    break
                output += chunk
            elif child.poll() is not None:
                break
        else:
            child.kill()
        os.close(leader)
    return child.wait(), output.decode(errors="replace")


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")
def test_the_cli_in_a_terminal_refuses_custom_code_without_asking(
    custom_code_bridge, tiny_bridge, tmp_path
) -> None:
    from bridge.index import ImageIndex

    directory, marker = custom_code_bridge
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (56, 56), "red").save(tmp_path / "photos" / "red.png")
    ImageIndex.build(tmp_path / "photos", tiny_bridge, tmp_path / "index", workers=0, progress=False)
    commands = [
        ["ground", str(tmp_path / "photos" / "red.png"), "a red circle", "--model", str(directory)],
        [
            "search",
            str(tmp_path / "index"),
            "--image",
            str(tmp_path / "photos" / "red.png"),
            "--model",
            str(directory),
        ],
    ]
    for command in commands:
        status, output = run_in_a_terminal([sys.executable, "-m", "bridge.cli", *command], typed="y\n")
        assert status == 2, output
        assert "needs custom Python code (auto_map in config.json)" in output
        assert "[y/N]" not in output and "trust_remote_code" not in output
        assert not marker.exists()
