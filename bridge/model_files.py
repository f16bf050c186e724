"""What a model folder holds, read before anything is built from it.

Two checks every load goes through:

- `read_saved_config(directory, kind)`: the config.json of a saved TextBridge or VisionLLM, which names
  its kind and format version. A folder of the other kind, of a newer format, a transformers checkpoint,
  or a damaged file is refused in one line saying what it is, what was expected and what to do. Folders
  saved before the kind was written down are told apart by their section ("bridge" or "vlm").
- `refuse_custom_code(name)`: transformers runs Python code shipped in a model folder whose config has an
  `auto_map` when the caller trusts it, and in a terminal it asks. dinobridge never does: every
  `from_pretrained` in the project passes `trust_remote_code=False`, and such a model is refused here
  with the reason, not with transformers' advice to trust it.

Torch-free, so code that only reads a saved bridge's files can use it without importing torch.

Not here: building models from what is read (model.py, vlm.py, vision.py, text.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bridge.config import ConfigError

CONFIG_FILE = "config.json"
FORMAT_VERSION = 1  # of the saved files this dinobridge writes; it reads this one and older
TEXT_BRIDGE = "dinobridge-text-bridge"
VISION_LLM = "dinobridge-vision-llm"

# The files in which transformers looks for an `auto_map` (custom classes for its Auto* loaders).
AUTO_MAP_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json")


@dataclass(frozen=True)
class SavedKind:
    section: str  # the key of config.json that holds its settings
    noun: str  # what a user calls it
    used_by: str  # what loads it, for a user who gave it where the other kind was expected
    written_by: str  # what saves one


SAVED_KINDS = {
    TEXT_BRIDGE: SavedKind(
        "bridge",
        "TextBridge",
        "TextBridge.from_pretrained and the index, search, ground, segment and eval verbs",
        "dinobridge train",
    ),
    VISION_LLM: SavedKind(
        "vlm",
        "VisionLLM",
        "VisionLLM.from_pretrained, the chat and export-llava verbs and train-vlm --base",
        "dinobridge train-vlm",
    ),
}


def saved_header(kind: str) -> dict:
    """The keys that open a saved config.json of `kind`."""
    return {"kind": kind, "format_version": FORMAT_VERSION}


def read_saved_config(directory: str | Path, kind: str) -> dict:
    """The parsed config.json of a directory saved as `kind` (TEXT_BRIDGE or VISION_LLM), its settings
    under the kind's section; anything else is refused with what it is and what to do."""
    directory = Path(directory)
    expected = SAVED_KINDS[kind]
    config_file = directory / CONFIG_FILE
    if not directory.is_dir():
        raise FileNotFoundError(f"'{directory}' is not a saved {expected.noun}: there is no such directory")
    if not config_file.is_file():
        raise FileNotFoundError(
            f"'{directory}' is not a saved {expected.noun}: it has no {CONFIG_FILE}; give the directory "
            f"that save_pretrained or {expected.written_by} wrote"
        )
    try:
        saved = json.loads(config_file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(f"'{config_file}' is not text ({error.reason}); {_damaged(expected)}") from None
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"'{config_file}' is not JSON ({error.msg} at line {error.lineno}); {_damaged(expected)}"
        ) from None
    except OSError as error:
        raise ConfigError(
            f"'{config_file}' cannot be read ({error.strerror}); check its permissions"
        ) from None
    if not isinstance(saved, dict):
        raise ConfigError(
            f"'{config_file}' holds a JSON {type(saved).__name__}, not an object; {_damaged(expected)}"
        )
    found = saved.get("kind", _kind_before_it_was_saved(saved))
    if found != kind:
        raise ConfigError(_wrong_kind(directory, config_file, saved, found, expected))
    version = saved.get("format_version", 1)  # files saved before the version was written are version 1
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ConfigError(
            f"'{config_file}' has format_version {version!r}, which no dinobridge writes; {_damaged(expected)}"
        )
    if version > FORMAT_VERSION:
        from bridge import __version__

        raise ConfigError(
            f"'{directory}' was saved in format version {version} by a newer dinobridge; this one "
            f"({__version__}) reads format version {FORMAT_VERSION} and older: upgrade dinobridge "
            "(pip install -U dinobridge)"
        )
    if not isinstance(saved.get(expected.section), dict):
        raise ConfigError(
            f"'{config_file}' has no '{expected.section}' section (the {expected.noun}'s settings); "
            f"{_damaged(expected)}"
        )
    return saved


def _kind_before_it_was_saved(saved: dict) -> str | None:
    for kind, saved_kind in SAVED_KINDS.items():
        if saved_kind.section in saved:
            return kind
    return None


def _damaged(expected: SavedKind) -> str:
    return f"the file is damaged or not a {expected.noun}'s: restore it from a copy or save the model again"


def _wrong_kind(directory: Path, config_file: Path, saved: dict, found, expected: SavedKind) -> str:
    if isinstance(found, str) and found in SAVED_KINDS:
        other = SAVED_KINDS[found]
        return (
            f"'{directory}' is a saved {other.noun}, but a {expected.noun} is expected here: a {other.noun} "
            f"is for {other.used_by}; give the directory of a {expected.noun} ({expected.written_by} "
            "saves one)"
        )
    if found is not None:
        return f"'{config_file}' says it is a {found!r}, not a saved {expected.noun}; {_damaged(expected)}"
    if "model_type" in saved:
        return (
            f"'{directory}' is a transformers '{saved['model_type']}' checkpoint, not a saved "
            f"{expected.noun}: give the directory of a {expected.noun} ({expected.written_by} saves one)"
        )
    return (
        f"'{config_file}' has no '{expected.section}' section (the {expected.noun}'s settings); "
        f"{_damaged(expected)}"
    )


def refuse_custom_code(name: str) -> None:
    """Raise ConfigError if the model folder (or hub repository) `name` needs Python code of its own.

    A folder is read as it is; a hub repository only as far as its files are in the local cache (looking
    one up online would cost a second wait where the hub cannot be reached): `native_code_only` checks
    again once transformers has fetched them.
    """
    for file_name in AUTO_MAP_FILES:
        path = _model_file(name, file_name)
        if path is None:
            continue
        try:
            settings = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # a damaged file is for its loader to name
        if isinstance(settings, dict) and settings.get("auto_map"):
            raise ConfigError(
                f"'{name}' needs custom Python code (auto_map in {file_name}); dinobridge never runs code "
                "from a model folder. Use a model transformers supports natively"
            )


@contextmanager
def native_code_only(*names: str) -> Iterator[None]:
    """Around the loading of the models `names`, each call passing `trust_remote_code=False` where it
    can: a model that needs custom code is refused with the reason before anything loads, or, for a hub
    repository not yet in the cache, once transformers has fetched its files and refused it.

    Inside, transformers refuses without asking even where a caller does not pass trust_remote_code
    (open_clip's text models): with no time given to answer, it asks nothing.
    """
    from transformers import dynamic_module_utils

    for name in names:
        refuse_custom_code(name)
    timeout, dynamic_module_utils.TIME_OUT_REMOTE_CODE = dynamic_module_utils.TIME_OUT_REMOTE_CODE, 0
    try:
        yield
    except ValueError:
        for name in names:
            refuse_custom_code(name)
        raise
    finally:
        dynamic_module_utils.TIME_OUT_REMOTE_CODE = timeout


def _model_file(name: str, file_name: str) -> str | None:
    path = Path(name)
    if path.is_dir():
        return str(path / file_name) if (path / file_name).is_file() else None
    if path.exists():
        return None  # a single file (an open_clip checkpoint) has no configs beside it
    from transformers.utils import cached_file

    try:
        return cached_file(
            name,
            file_name,
            local_files_only=True,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
    except (OSError, ValueError):  # not a repository name: the loader says so
        return None
