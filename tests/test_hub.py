"""Bridges and VisionLLMs on the Hub, with no network: loaded by repo id from a hub cache laid out as
huggingface_hub lays it out (HF_HUB_OFFLINE=1), pushed to a stand-in Hub on 127.0.0.1 that answers the
endpoints huggingface_hub's HfApi calls (create repo, create branch, preupload, commit), and the model card
read back from what was pushed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import constants
from test_vlm import tiny_vlm

from bridge.cli import main
from bridge.config import ConfigError
from bridge.hub import local_directory, model_card, push_to_hub
from bridge.model import TextBridge
from bridge.vlm import VisionLLM

REPO = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # a snapshot's name in the cache: its commit hash


def lay_out_in_hub_cache(directory: Path, cache: Path, repo_id: str, revision: str = "main") -> Path:
    """Put `directory`'s files in the hub cache as huggingface_hub does: the bytes once in blobs/ (named by
    their hash), a snapshot of symlinks named by the commit, and refs/<revision> naming that commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(path.read_bytes())
        link = snapshot / path.relative_to(directory)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(COMMIT)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache, with huggingface_hub offline (as HF_HUB_CACHE and HF_HUB_OFFLINE=1 set it)."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_a_bridge_loads_by_repo_id_from_the_offline_cache(tmp_path, tiny_bridge, offline_cache) -> None:
    tiny_bridge.save_pretrained(tmp_path / "bridge")
    snapshot = lay_out_in_hub_cache(tmp_path / "bridge", offline_cache, "someone/tiny-bridge")
    assert local_directory("someone/tiny-bridge") == snapshot
    from_hub = TextBridge.from_pretrained("someone/tiny-bridge")
    from_folder = TextBridge.from_pretrained(tmp_path / "bridge")
    pixels = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(
        from_hub.encode_image(pixels).detach(), from_folder.encode_image(pixels).detach()
    )
    np.testing.assert_array_equal(
        from_hub.encode_texts(["a red circle"]), from_folder.encode_texts(["a red circle"])
    )
    assert from_hub.fingerprint() == from_folder.fingerprint()


@pytest.mark.slow  # a fresh process imports torch and transformers: ~8 s alone, more on a busy machine
def test_the_cli_loads_by_repo_id_with_hf_hub_offline(tmp_path, tiny_bridge) -> None:
    """The real environment variables, in a fresh process: HF_HUB_CACHE and HF_HUB_OFFLINE=1 are honoured."""
    tiny_bridge.save_pretrained(tmp_path / "bridge")
    lay_out_in_hub_cache(tmp_path / "bridge", tmp_path / "cache", "someone/tiny-bridge", revision="v1")
    script = (
        "import json; from bridge import TextBridge; "
        "b = TextBridge.from_pretrained('someone/tiny-bridge', revision='v1'); "
        "print(json.dumps(b.encode_texts(['a red circle']).tolist()))"
    )
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    # Another process with another thread count: equal to float rounding (bitwise in-process: above).
    np.testing.assert_allclose(
        np.array(json.loads(out.stdout)), tiny_bridge.encode_texts(["a red circle"]), atol=1e-6
    )


def test_a_repo_missing_from_the_offline_cache_is_one_line_with_the_fix(offline_cache) -> None:
    with pytest.raises(ConfigError) as error:
        TextBridge.from_pretrained("someone/not-downloaded")
    message = str(error.value)
    assert "'someone/not-downloaded' is not in the Hugging Face cache" in message
    assert "HF_HUB_OFFLINE=1" in message and "hf download someone/not-downloaded" in message
    assert "\n" not in message


def test_local_paths_stay_local(tmp_path) -> None:
    """A path that does not exist is not looked up on the Hub when it cannot be a repo id, and a folder
    named like a repo id is the folder."""
    with pytest.raises(FileNotFoundError, match="no such directory"):
        TextBridge.from_pretrained(tmp_path / "missing")
    with pytest.raises(ConfigError, match="revision='v1' is for a hub repo id"):
        local_directory(str(tmp_path), revision="v1")


def test_hub_loads_refuse_custom_code(tmp_path, tiny_bridge, offline_cache) -> None:
    """A bridge from the Hub whose encoder folder asks for its own code is refused, as a local one is."""
    tiny_bridge.save_pretrained(tmp_path / "bridge")
    encoder_config = tmp_path / "bridge" / "encoder" / "config.json"
    encoder_config.write_text(
        json.dumps({**json.loads(encoder_config.read_text()), "auto_map": {"AutoModel": "x.Y"}})
    )
    lay_out_in_hub_cache(tmp_path / "bridge", offline_cache, "someone/custom-code")
    with pytest.raises(ConfigError, match="needs custom Python code"):
        TextBridge.from_pretrained("someone/custom-code")


# --- push, against a stand-in Hub ---------------------------------------------------------------------------


class StandInHub(BaseHTTPRequestHandler):
    """The Hub endpoints HfApi.create_repo / create_branch / create_commit use, recording what they get."""

    calls: list[tuple[str, str, object]] = []
    files: dict[str, bytes] = {}

    def log_message(self, *args) -> None:
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        path = self.path.split("?")[0]
        endpoint = f"http://{self.headers['Host']}"
        if path == "/api/repos/create":
            request = json.loads(body)
            self.calls.append(("create", path, request))
            return self._reply(200, {"url": f"{endpoint}/{request.get('organization')}/{request['name']}"})
        if path == "/api/validate-yaml":  # the README's front matter, checked as the Hub checks it: YAML
            content = json.loads(body)["content"]
            metadata = yaml.safe_load(content.split("---\n")[1])
            self.calls.append(("validate-yaml", path, metadata))
            return self._reply(200, {"warnings": []})
        if "/branch/" in path:
            self.calls.append(("branch", path, None))
            return self._reply(200, {})
        if "/preupload/" in path:
            files = json.loads(body)["files"]
            self.calls.append(("preupload", path, [f["path"] for f in files]))
            # Every file as a regular git blob (inline in the commit): no LFS or Xet storage to stand in for.
            return self._reply(
                200,
                {
                    "files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                    ]
                },
            )
        if "/commit/" in path:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            self.calls.append(("commit", path, lines[0]["value"]))
            for line in lines[1:]:
                assert line["key"] == "file", line  # nothing else for regular uploads
                self.files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            repo = path.split("/api/models/")[1].split("/commit/")[0]
            return self._reply(200, {"commitUrl": f"{endpoint}/{repo}/commit/{COMMIT}", "commitOid": COMMIT})
        self.calls.append(("unknown", path, None))
        return self._reply(404, {"error": f"the stand-in has no {path}"})


@pytest.fixture
def stand_in_hub(monkeypatch):
    StandInHub.calls, StandInHub.files = [], {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandInHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_stand_in")
    yield StandInHub
    server.shutdown()


def training_run_directory(directory: Path, bridge: TextBridge) -> None:
    """What `dinobridge train --out` leaves: the bridge, the run's record, a checkpoint and the cache."""
    bridge.save_pretrained(directory)
    run = {
        "run": {"train": {"loss": "infonce", "steps": 3, "batch_size": 8, "lr": 0.004}},
        "data": "/home/me/pairs.jsonl",
    }
    (directory / "run_config.json").write_text(json.dumps(run))
    log = [{"step": s, "loss": 2.0 - s / 10, "lr": 0.004} for s in (1, 2, 3)]
    (directory / "train_log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in log))
    (directory / "metrics.json").write_text(
        json.dumps({"image_to_text_r@1": 0.4375, "text_to_image_r@1": 0.5})
    )
    (directory / "checkpoints" / "step-0000003").mkdir(parents=True)
    (directory / "checkpoints" / "step-0000003" / "head.safetensors").write_bytes(b"optimizer state")


def test_push_sends_the_bridge_and_its_card_in_one_commit(tmp_path, tiny_bridge, stand_in_hub) -> None:
    training_run_directory(tmp_path / "run", tiny_bridge)
    assert main(["push", str(tmp_path / "run"), "someone/tiny-bridge", "--private", "--revision", "v1"]) == 0
    kinds = [call[0] for call in stand_in_hub.calls]
    assert kinds == ["create", "branch", "validate-yaml", "preupload", "commit"], stand_in_hub.calls
    metadata = stand_in_hub.calls[2][2]
    assert (
        metadata["library_name"] == "dinobridge"
        and "sentence-transformers/all-MiniLM-L6-v2" in metadata["base_model"]
    )
    created = stand_in_hub.calls[0][2]  # huggingface_hub 1.x says private: true, 2.x visibility: private
    assert (created.get("private") is True or created.get("visibility") == "private") and created[
        "name"
    ] == "tiny-bridge"
    assert stand_in_hub.calls[1][1].endswith("/api/models/someone/tiny-bridge/branch/v1")
    assert stand_in_hub.calls[4][1].endswith("/api/models/someone/tiny-bridge/commit/v1")
    pushed = stand_in_hub.files
    # What loading needs and the run's record, byte for byte; never the checkpoints or local paths.
    assert sorted(pushed) == sorted(
        ["README.md", "config.json", "model.safetensors", "metrics.json", "train_log.jsonl"]
        + [p.relative_to(tmp_path / "run").as_posix() for p in (tmp_path / "run" / "encoder").rglob("*")]
    )
    for name, data in pushed.items():
        if name != "README.md":
            assert data == (tmp_path / "run" / name).read_bytes(), name
    assert not (tmp_path / "run" / "README.md").exists()  # the directory is left as it was

    # What was pushed loads by repo id, from the cache as a download would have filled it.
    pushed_dir = tmp_path / "pushed"
    for name, data in pushed.items():
        (pushed_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (pushed_dir / name).write_bytes(data)
    constants.HF_HUB_OFFLINE = True  # restored by the fixture's monkeypatch
    constants.HF_HUB_CACHE = str(tmp_path / "cache")
    lay_out_in_hub_cache(pushed_dir, tmp_path / "cache", "someone/tiny-bridge", revision="v1")
    loaded = TextBridge.from_pretrained("someone/tiny-bridge", revision="v1")
    assert loaded.fingerprint() == tiny_bridge.fingerprint()


def test_the_model_card_says_what_the_bridge_is(tmp_path, tiny_bridge) -> None:
    training_run_directory(tmp_path / "run", tiny_bridge)
    card = model_card(tmp_path / "run", "someone/tiny-bridge")
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "library_name: dinobridge" in front and "- dinobridge" in front
    assert "base_model:\n- sentence-transformers/all-MiniLM-L6-v2" in front  # the tower, loaded by name
    assert "built from a config (model_type dinov2, hidden_size 32, num_hidden_layers 2" in body
    assert "`encoder/`" in body  # the random encoder travels inside
    assert "`attention`, 32 -> 384" in body
    assert (
        "[`sentence-transformers/all-MiniLM-L6-v2`](https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2)"
        in body
    )
    assert "data: `pairs.jsonl`" in body and "/home/me" not in card  # no local paths published
    assert "steps 3" in body and "steps run: 3, final loss 1.7000" in body
    assert "| image_to_text_r@1 | 0.4375 |" in body
    assert 'TextBridge.from_pretrained("someone/tiny-bridge")' in body
    assert "export-llava" not in body


def test_a_vision_llm_card_and_push(tmp_path, stand_in_hub) -> None:
    model = tiny_vlm()
    model.save_pretrained(tmp_path / "vlm")
    card = model_card(tmp_path / "vlm", "someone/tiny-vlm")
    assert "pipeline_tag: image-text-to-text" in card and "base_model" not in card  # both parts built here
    assert "| LLM | built from a config (model_type llama" in card and "`llm/`" in card
    assert "dinobridge export-llava someone/tiny-vlm llava-out/" in card
    assert 'VisionLLM.from_pretrained("someone/tiny-vlm")' in card
    url = model.push_to_hub("someone/tiny-vlm")  # saved to a temporary directory, then pushed
    assert url.endswith(f"/someone/tiny-vlm/commit/{COMMIT}")
    assert {"config.json", "model.safetensors", "llm/config.json", "encoder/config.json"} <= set(
        stand_in_hub.files
    )
    pushed_dir = tmp_path / "pushed"
    for name, data in stand_in_hub.files.items():
        (pushed_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (pushed_dir / name).write_bytes(data)
    constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE = True, str(tmp_path / "cache")
    lay_out_in_hub_cache(pushed_dir, tmp_path / "cache", "someone/tiny-vlm")
    loaded = VisionLLM.from_pretrained("someone/tiny-vlm")
    for mine, theirs in zip(model.projector.parameters(), loaded.projector.parameters(), strict=True):
        assert torch.equal(mine, theirs)


def test_push_refuses_a_part_from_a_local_folder(tmp_path, tiny_bridge, stand_in_hub) -> None:
    tiny_bridge.save_pretrained(tmp_path / "bridge")
    config_file = tmp_path / "bridge" / "config.json"
    saved = json.loads(config_file.read_text())
    saved["bridge"]["text"]["name"] = str(tmp_path / "my-tower")
    config_file.write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match="loads its text tower from the local folder"):
        push_to_hub(tmp_path / "bridge", "someone/tiny-bridge")
    assert stand_in_hub.calls == []  # refused before anything was sent


def test_an_index_records_a_hub_model_by_its_repo_id_and_a_folder_by_its_absolute_path(
    tmp_path: Path, tiny_bridge, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_index import make_photos

    from bridge.index import ImageIndex
    from bridge.index_files import read_manifest

    make_photos(tmp_path / "photos", 2)
    monkeypatch.chdir(tmp_path)
    for model, recorded in (("someone/bridge", "someone/bridge"), ("saved", str(tmp_path / "saved"))):
        (tmp_path / "saved").mkdir(exist_ok=True)
        out = tmp_path / f"index-{model.replace('/', '-')}"
        ImageIndex.build("photos", tiny_bridge, out, workers=0, progress=False, model_dir=model)
        assert read_manifest(out)["model_dir"] == recorded
