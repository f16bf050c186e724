"""Saved bridges and VisionLLMs on the Hugging Face Hub: loaded by repo id, pushed with a model card.

- `local_directory(name, revision)`: what `TextBridge.from_pretrained` and `VisionLLM.from_pretrained`
  read. A directory that exists is itself; anything else shaped like a repo id ("owner/name") is fetched
  through huggingface_hub's cache (`snapshot_download`: HF_HUB_CACHE, HF_HUB_OFFLINE and HF_TOKEN as
  everywhere in the ecosystem), so a model pulled once loads offline after. Failures are one line that
  says what was asked for and what to do.
- `push_to_hub(directory, repo_id)`: uploads what loading needs (config.json, model.safetensors, and the
  parts built from a config: encoder/, llm/, adapters), the training record (train_log.jsonl,
  metrics.json) and a generated README.md (the model card). Parts loaded by hub name are referenced by
  that name; a part loaded from a local folder cannot travel and is refused before anything is sent.
  run_config.json and checkpoints/ stay home: the first holds the local paths of the run, the second
  only matters for --resume.
- `model_card(directory, repo_id)`: the README.md text, from what the directory records.

Loading from the Hub runs no code from the repository, as loading from a folder does not: the saved
config is read by model_files.read_saved_config and every part through refuse_custom_code, as for any
directory.

Not here: saving (model.py, vlm.py), training (training/).
"""

from __future__ import annotations

import json
import re
import tempfile
from fnmatch import fnmatch
from pathlib import Path

from bridge.config import ConfigError
from bridge.model_files import CONFIG_FILE, SAVED_KINDS, TEXT_BRIDGE, VISION_LLM, read_saved_config

# What loading a saved model reads, and the record of its training shown on the Hub.
LOADED_FILES = ["config.json", "model.safetensors", "encoder/*", "llm/*", "adapter/*", "adapters/*"]
RECORD_FILES = ["train_log.jsonl", "metrics.json"]
UPLOADED = LOADED_FILES + RECORD_FILES
CARD_FILE = "README.md"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def local_directory(name: str | Path, revision: str | None = None) -> Path:
    """The local directory of a saved model given as a directory or a hub repo id (at `revision`)."""
    path = Path(name).expanduser()
    if isinstance(name, Path) or path.exists() or not _REPO_ID.match(str(name)) or str(name).count("/") != 1:
        if revision is not None:
            raise ConfigError(f"revision='{revision}' is for a hub repo id; '{name}' is a local path")
        return path  # read_saved_config names what is wrong with it
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" at revision '{revision}'" if revision else ""
    try:
        return Path(snapshot_download(str(name), revision=revision, allow_patterns=LOADED_FILES))
    except RevisionNotFoundError:
        raise ConfigError(
            f"the Hub repository '{name}' has no revision '{revision}'; check the name"
        ) from None
    except GatedRepoError:
        raise ConfigError(
            f"'{name}' is gated on the Hub: accept its terms on huggingface.co, then log in (hf auth login)"
        ) from None
    except RepositoryNotFoundError:
        raise ConfigError(
            f"'{name}' is neither a local directory nor a model on the Hugging Face Hub (or it is private: "
            "log in with `hf auth login` or set HF_TOKEN); give the directory save_pretrained wrote"
        ) from None
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise ConfigError(
                f"'{name}'{at} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                "HF_HUB_OFFLINE=1 forbids downloading it: download it once with network access "
                f"(hf download {name}), or give a local directory"
            ) from None
        raise ConfigError(
            f"'{name}'{at} cannot be downloaded (the Hub is unreachable) and is not in the Hugging Face "
            f"cache ({constants.HF_HUB_CACHE}); connect, or give a local directory"
        ) from None


def push_to_hub(
    directory: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload the saved model in `directory` to the Hub repository `repo_id` (created if missing, on
    branch `revision`, created too) with a generated model card; returns the commit's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    directory = Path(directory)
    kind, saved = _saved(directory)
    _refuse_local_parts(directory, kind, saved)
    files = sorted(
        path.relative_to(directory).as_posix()
        for path in directory.rglob("*")
        if path.is_file() and any(fnmatch(path.relative_to(directory).as_posix(), p) for p in UPLOADED)
    )
    # One commit: the files as they are in the directory (left unchanged) and the generated card.
    operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(directory / f)) for f in files]
    card = model_card(directory, repo_id).encode("utf-8")
    operations.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card))
    api = HfApi(token=token)
    try:
        # Not private: the Hub's default (an organisation may default to private), never forced public.
        api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or f"Upload {SAVED_KINDS[kind].noun} with dinobridge",
            revision=revision,
        )
    except HfHubHTTPError as error:
        # The Hub's answer (no token, no write access, a name it refuses) in one line, with the fix.
        reason = str(error).splitlines()[0]
        raise ConfigError(
            f"the Hub refused the push of '{directory}' to '{repo_id}' ({reason}); check the repo id and "
            "that you are logged in with write access (hf auth login, or HF_TOKEN)"
        ) from None
    return str(commit.commit_url)


def push_model(model, repo_id: str, **options) -> str:
    """Save `model` (a TextBridge or VisionLLM) to a temporary directory and push that (`push_to_hub`)."""
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        return push_to_hub(directory, repo_id, **options)


def _saved(directory: Path) -> tuple[str, dict]:
    """(kind, config.json) of a saved TextBridge or VisionLLM; anything else is refused in one line."""
    if not directory.is_dir():
        raise FileNotFoundError(f"'{directory}' is not a directory; give the directory save_pretrained wrote")
    try:
        return TEXT_BRIDGE, read_saved_config(directory, TEXT_BRIDGE)
    except ConfigError as not_a_bridge:
        try:
            return VISION_LLM, read_saved_config(directory, VISION_LLM)
        except ConfigError:
            raise not_a_bridge from None


def _parts(kind: str, saved: dict) -> dict[str, dict]:
    """The named parts of a saved model's config: encoder, text tower or LLM, projector."""
    settings = saved[SAVED_KINDS[kind].section]
    second = (
        ("text tower", settings.get("text", {})) if kind == TEXT_BRIDGE else ("LLM", settings.get("llm", {}))
    )
    return {
        "encoder": settings.get("encoder", {}),
        second[0]: second[1],
        "projector": settings.get("projector", {}),
    }


def _refuse_local_parts(directory: Path, kind: str, saved: dict) -> None:
    for part, settings in _parts(kind, saved).items():
        name = settings.get("name")
        if isinstance(name, str) and Path(name).is_absolute():
            raise ConfigError(
                f"'{directory}' loads its {part} from the local folder '{name}', which others cannot reach; "
                f"push that model to the Hub first and set the {part}'s name to its repo id in "
                f"{directory / CONFIG_FILE}, then push again"
            )


# --- the model card ----------------------------------------------------------------------------------------


def model_card(directory: str | Path, repo_id: str) -> str:
    """README.md for the Hub: YAML front matter (library, tags, base models), then what the model is made
    of, how it was trained and how well it did as the directory records it, and how to use it."""
    directory = Path(directory)
    kind, saved = _saved(directory)
    parts = _parts(kind, saved)
    bases = [s["name"] for s in parts.values() if is_hub_name(s.get("name"))]
    vlm = kind == VISION_LLM
    tags = ["dinobridge", "dinov2", "image-text-to-text" if vlm else "image-text-retrieval"]
    front = ["---", "library_name: dinobridge", "tags:", *(f"- {tag}" for tag in tags)]
    if bases:
        front += ["base_model:", *(f"- {name}" for name in bases)]
    front += [f"pipeline_tag: {'image-text-to-text' if vlm else 'zero-shot-image-classification'}", "---"]
    noun = SAVED_KINDS[kind].noun
    what = (
        "a frozen DINOv2 image encoder, a trained projector and a frozen LLM: it answers questions about images"
        if vlm
        else "a frozen DINOv2 image encoder and a trained projector into the embedding space of a frozen "
        "text tower: images and texts embed side by side, for search and zero-shot classification"
    )
    lines = [*front, "", f"# {repo_id.split('/')[-1]}", "", f"A dinobridge {noun}: {what}.", ""]
    lines += ["## Parts", "", "| part | what it is | where it comes from |", "| --- | --- | --- |"]
    lines += [_part_row(part, settings, saved, directory) for part, settings in parts.items()]
    lines += ["", *_training_section(directory), *_evaluation_section(directory), *_usage(kind, repo_id)]
    return "\n".join(lines) + "\n"


def is_hub_name(name) -> bool:
    """Whether `name` reads as a Hub repo id (owner/name); a caller checks first that no such path exists."""
    return isinstance(name, str) and bool(_REPO_ID.match(name)) and name.count("/") == 1


def _part_row(part: str, settings: dict, saved: dict, directory: Path) -> str:
    name = settings.get("name")
    if part == "projector":
        options = ", ".join(f"{k}={v}" for k, v in settings.get("options", {}).items())
        widths = f"{settings.get('in_dim')} -> {settings.get('out_dim')}"
        return f"| projector | `{settings.get('kind')}`, {widths}{f' ({options})' if options else ''} | trained: `model.safetensors` |"
    kind = f"`{settings['kind']}` " if "kind" in settings else ""
    if part == "LLM" and saved.get("vlm", {}).get("lora"):
        lora = saved["vlm"]["lora"]
        kind += f"with LoRA adapters (r={lora.get('r')}, alpha={lora.get('alpha')}, in `adapter/`) "
    if name in ("encoder", "llm") and (directory / name).is_dir():
        architecture = _architecture(directory / name)
        return f"| {part} | {kind}built from a config{architecture} | inside this repository: `{name}/` |"
    layer = f", layer {settings['layer']}" if settings.get("layer") is not None else ""
    return f"| {part} | {kind}[`{name}`](https://huggingface.co/{name}){layer} | the Hub, by name |"


def _architecture(folder: Path) -> str:
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    keys = ("model_type", "hidden_size", "num_hidden_layers")
    shown = ", ".join(f"{key} {config[key]}" for key in keys if key in config)
    return f" ({shown}; random weights, frozen)" if shown else ""


def _training_section(directory: Path) -> list[str]:
    run_file, log_file = directory / "run_config.json", directory / "train_log.jsonl"
    lines = ["## Training", ""]
    try:
        run = json.loads(run_file.read_text(encoding="utf-8")) if run_file.is_file() else None
        steps = [
            json.loads(line) for line in log_file.read_text(encoding="utf-8").splitlines() if line.strip()
        ]
    except (OSError, ValueError):
        run, steps = None, []
    if run is None and not steps:
        return [*lines, "Not recorded in the saved directory (it was saved outside `dinobridge train`).", ""]
    if run is not None:
        train = run.get("run", {}).get("train", {})
        shown = ", ".join(
            f"{key} {train[key]}" for key in ("loss", "stage", "steps", "batch_size", "lr") if key in train
        )
        data = Path(str(run.get("data"))).name if run.get("data") else "not recorded"
        lines += [f"- data: `{data}` (the file the run read; the images are not part of this repository)"]
        if shown:
            lines += [f"- settings: {shown}"]
    if steps:
        last = steps[-1]
        lines += [f"- steps run: {last.get('step')}, final loss {last.get('loss'):.4f} (`train_log.jsonl`)"]
    return [*lines, ""]


def _evaluation_section(directory: Path) -> list[str]:
    metrics_file = directory / "metrics.json"
    try:
        metrics = json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.is_file() else None
    except (OSError, ValueError):
        metrics = None
    if not isinstance(metrics, dict) or not metrics:
        return ["## Evaluation", "", "No figures recorded with this model.", ""]
    rows = [
        f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |"
        for key, value in metrics.items()
    ]
    return [
        "## Evaluation",
        "",
        "On the run's held-out images (`metrics.json`):",
        "",
        "| metric | value |",
        "| --- | --- |",
        *rows,
        "",
    ]


def _usage(kind: str, repo_id: str) -> list[str]:
    lines = ["## Use", "", "```bash", "pip install dinobridge", "```", ""]
    if kind == TEXT_BRIDGE:
        return lines + [
            "```python",
            "from bridge import TextBridge",
            "",
            f'bridge = TextBridge.from_pretrained("{repo_id}")',
            'images = bridge.encode_images(["photo.jpg"])',
            'texts = bridge.encode_texts(["a dog on a beach"])',
            "print(images @ texts.T)",
            "```",
            "",
            "```bash",
            f"dinobridge index photos/ --model {repo_id} --out photos.index",
            f'dinobridge search photos.index "a dog on a beach" --model {repo_id}',
            "```",
        ]
    return lines + [
        "```python",
        "from bridge import VisionLLM",
        "",
        f'model = VisionLLM.from_pretrained("{repo_id}")',
        'print(model.chat("What is in the image?", ["photo.jpg"]))',
        "```",
        "",
        "As a plain transformers LLaVA checkpoint (LlavaForConditionalGeneration and AutoProcessor):",
        "",
        "```bash",
        f"dinobridge export-llava {repo_id} llava-out/",
        "```",
    ]
