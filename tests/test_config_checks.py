"""Configs and CLI arguments are checked when read: a bad value is one message naming the file or the
option, the key, the value and what is allowed; never a traceback, never a silent default."""

from __future__ import annotations

import ast
import dataclasses
import math
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.cli import main
from bridge.config import (
    LOSS_NAMES,
    Allowed,
    BridgeConfig,
    ConfigError,
    LoraSettings,
    RunConfig,
    VisionLLMConfig,
    VLMRunConfig,
    from_dict,
    load_config,
    to_dict,
)

ROOT = Path(__file__).resolve().parent.parent


def load(tmp_path: Path, text: str, cls: type = RunConfig, name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return load_config(path, cls)


def refusal(tmp_path: Path, text: str, cls: type = RunConfig, name: str = "run.yaml") -> str:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text, cls, name)
    return str(caught.value).replace(str(tmp_path / name), name)


# --- values --------------------------------------------------------------------------------------------


def test_yaml_1_1_numbers_written_as_users_write_them_are_read_as_numbers(tmp_path):
    config = load(tmp_path, "train:\n  lr: 1e-3\n  steps: 5e3\n  weight_decay: 1E-2\n  held_out: 0.1\n")
    assert config.train.lr == 0.001 and type(config.train.lr) is float
    assert config.train.steps == 5000 and type(config.train.steps) is int
    assert config.train.weight_decay == 0.01
    vlm = load(tmp_path, "train:\n  lr: 2.0e-4\n  held_out: 500\n", VLMRunConfig)
    assert vlm.train.lr == 2e-4 and vlm.train.held_out == 500  # an int is a fine float


BAD_VALUES = [
    ("train:\n  batch_size: 0\n", "train.batch_size is 0; it must be a whole number >= 1"),
    ("train:\n  grad_accum: 0\n", "train.grad_accum is 0; it must be a whole number >= 1"),
    ("train:\n  steps: -5\n", "train.steps is -5; it must be a whole number >= 1"),
    ("train:\n  steps: 1.5\n", "train.steps is 1.5; it must be a whole number >= 1"),
    ("train:\n  steps: true\n", "train.steps is true; it must be a whole number >= 1"),
    ("train:\n  steps: '12 steps'\n", "train.steps is '12 steps'; it must be a whole number >= 1"),
    ("train:\n  lr: -1e-3\n", "train.lr is '-1e-3'; it must be a number > 0"),
    ("train:\n  lr: 0\n", "train.lr is 0; it must be a number > 0"),
    ("train:\n  lr: .nan\n", "train.lr is nan; it must be a finite number"),
    ("train:\n  lr: .inf\n", "train.lr is inf; it must be a finite number"),
    ("train:\n  lr: [0.1]\n", "train.lr is [0.1]; it must be a number > 0"),
    ("train:\n  weight_decay: -0.1\n", "train.weight_decay is -0.1; it must be a number >= 0"),
    ("train:\n  dense_weight: -1\n", "train.dense_weight is -1; it must be a number >= 0"),
    ("train:\n  warmup_steps: -1\n", "train.warmup_steps is -1; it must be a whole number >= 0"),
    ("train:\n  num_workers: -2\n", "train.num_workers is -2; it must be a whole number >= 0"),
    ("train:\n  seed: -1\n", "train.seed is -1; it must be a whole number >= 0 and <= 4294967295"),
    (
        "train:\n  steps: 99999999999999999999\n",
        "train.steps is 99999999999999999999; it must be at most 9.2e+18 in size",
    ),
    ("train:\n  held_out: -1\n", "train.held_out is -1; it must be a number >= 0, or null"),
    (
        "train:\n  held_out: 2.5\n",
        "train.held_out is 2.5; a value of 1 or more is a count and must be whole; give 2, or a fraction below 1",
    ),
    ("train:\n  loss: clip\n", "train.loss is 'clip'; it must be one of infonce, siglip"),
    (
        "train:\n  mixed_precision: fp32\n",
        "train.mixed_precision is 'fp32'; it must be one of no, bf16, fp16",
    ),
    (
        "train:\n  hard_negative_words: [circle, square]\n",
        "train.hard_negative_words[0] is 'circle'; it must be a list of non-empty strings; "
        "e.g. [[circle, square, triangle]], a list of word groups",
    ),
    (
        "train:\n  hard_negative_words: [[circle, Circle]]\n",
        "train.hard_negative_words is [['circle', 'Circle']]; group 1 ['circle', 'Circle'] needs at least two "
        "different words to swap between; e.g. [[circle, square, triangle]], a list of word groups",
    ),
    ("train:\n  cache_dir: ''\n", "train.cache_dir is ''; it must be a non-empty string, or null"),
    (
        "train: null\n",
        "train is null; it must be a mapping of loss, steps, epochs, batch_size, lr, weight_decay, "
        "warmup_steps, grad_accum, mixed_precision, seed, held_out, eval_every, checkpoint_every, "
        "best_metric, cache, report_to, cache_dir, num_workers, dense_weight, hard_negative_words, lora",
    ),
    ("bridge: [encoder]\n", "bridge is ['encoder']; it must be a mapping of encoder, text, projector"),
    (
        "bridge:\n  encoder:\n    image_size: 0\n",
        "bridge.encoder.image_size is 0; it must be a whole number >= 1, or null",
    ),
    (
        "bridge:\n  encoder:\n    architecture: [1, 2]\n",
        "bridge.encoder.architecture is [1, 2]; it must be a mapping of names to values",
    ),
    ("bridge:\n  text:\n    name: 2024\n", "bridge.text.name is 2024; it must be a non-empty string"),
    (
        "bridge:\n  text:\n    max_length: 0\n",
        "bridge.text.max_length is 0; it must be a whole number >= 1, or null",
    ),
    (
        "bridge:\n  projector:\n    in_dim: -768\n",
        "bridge.projector.in_dim is -768; it must be a whole number >= 1, or null",
    ),
    (
        "bridge:\n  projector:\n    kind: null\n",
        "bridge.projector.kind is null; it must be a non-empty string",
    ),
    (
        "bridge:\n  projector:\n    options: 5\n",
        "bridge.projector.options is 5; it must be a mapping of names to values",
    ),
]


@pytest.mark.parametrize(
    ("text", "message"), BAD_VALUES, ids=[case[1].split(" is ")[0] for case in BAD_VALUES]
)
def test_a_bad_value_is_refused_naming_file_key_value_and_what_is_allowed(tmp_path, text, message):
    assert refusal(tmp_path, text) == f"run.yaml: {message}"


BAD_VLM_VALUES = [
    ("train:\n  stage: 3\n", "train.stage is 3; it must be one of 0, 1, 2"),
    ("train:\n  sub_batches: 0\n", "train.sub_batches is 0; it must be a whole number >= 1"),
    ("train:\n  freeze_projector: 'yes'\n", "train.freeze_projector is 'yes'; it must be true or false"),
    ("train:\n  group_by_length: 1\n", "train.group_by_length is 1; it must be true or false"),
    ("vlm:\n  select_strategy: all\n", "vlm.select_strategy is 'all'; it must be one of default, full"),
    ("vlm:\n  lora:\n    dropout: 1.5\n", "vlm.lora.dropout is 1.5; it must be a number >= 0 and < 1"),
    ("vlm:\n  lora:\n    dropout: -0.1\n", "vlm.lora.dropout is -0.1; it must be a number >= 0 and < 1"),
    ("vlm:\n  lora:\n    r: 0\n", "vlm.lora.r is 0; it must be a whole number >= 1"),
    (
        "vlm:\n  lora:\n    target_modules: q_proj\n",
        "vlm.lora.target_modules is 'q_proj'; it must be a list of non-empty strings",
    ),
    (
        "vlm:\n  lora:\n    target_modules: []\n",
        "vlm.lora.target_modules is []; name at least one module of the LLM to attach adapters to",
    ),
    (
        "vlm:\n  lora: 16\n",
        "vlm.lora is 16; it must be a mapping of r, alpha, dropout, target_modules, or null",
    ),
    ("vlm:\n  llm:\n    image_token: ' '\n", "vlm.llm.image_token is ' '; it must be a non-empty string"),
]


@pytest.mark.parametrize(
    ("text", "message"), BAD_VLM_VALUES, ids=[c[1].split(" is ")[0] for c in BAD_VLM_VALUES]
)
def test_a_bad_vlm_value_is_refused_naming_file_key_value_and_what_is_allowed(tmp_path, text, message):
    assert refusal(tmp_path, text, VLMRunConfig) == f"run.yaml: {message}"


def test_more_warm_up_than_steps_is_allowed_as_the_rate_then_ramps_for_the_whole_run(tmp_path):
    # `--steps 50` on a recipe with 200 warm-up steps is a quick try, not a mistake.
    assert load(tmp_path, "train:\n  steps: 10\n  warmup_steps: 200\n").train.warmup_steps == 200


def test_a_section_left_partly_out_keeps_the_enclosing_configs_defaults(tmp_path):
    # The LLM route's projector is 'mlp' and its encoder reads layer -1; giving one key of either must
    # not fall back to the text route's 'attention' and null.
    config = load(
        tmp_path, "vlm:\n  projector:\n    options: {}\n  encoder:\n    image_size: 224\n", VLMRunConfig
    )
    assert config.vlm.projector.kind == "mlp"
    assert (config.vlm.encoder.layer, config.vlm.encoder.image_size) == (-1, 224)


def test_every_default_is_allowed_by_its_own_rules():
    for cls in (RunConfig, VLMRunConfig, BridgeConfig, VisionLLMConfig, LoraSettings):
        assert from_dict(cls, to_dict(cls())) == cls()
    with_lora = VisionLLMConfig(lora=LoraSettings())
    assert from_dict(VisionLLMConfig, to_dict(with_lora)) == with_lora


def _literal_names(path: Path, name: str) -> tuple:
    """The names a module assigns to `name` (a tuple, or a dict's keys), read without importing it: the
    modules import torch, transformers and peft, seconds for a check of a few strings."""
    for node in ast.parse(path.read_text()).body:
        targets = [
            t.id for t in getattr(node, "targets", [getattr(node, "target", None)]) if hasattr(t, "id")
        ]
        if name in targets:
            value = node.value
            return (
                tuple(key.value for key in value.keys)
                if isinstance(value, ast.Dict)
                else ast.literal_eval(value)
            )
    raise AssertionError(f"{path} assigns no {name}")


def test_the_names_the_loader_allows_are_the_ones_the_code_looks_up():
    assert LOSS_NAMES == _literal_names(ROOT / "training" / "losses.py", "LOSSES")


# --- files ---------------------------------------------------------------------------------------------

BAD_FILES = [
    (
        "run.yaml",
        "train:\n  lr: [0.1\n  steps: 3\n",
        "config 'run.yaml' is not valid YAML: line 3, column 8: expected ',' or ']', but got ':'",
    ),
    (
        "run.yaml",
        "train:\n  lr: 0.1\n  lr: 0.2\n",
        "config 'run.yaml' is not valid YAML: line 3, column 3: key 'lr' is given twice in one mapping",
    ),
    (
        "run.yaml",
        "- bridge\n- train\n",
        "run.yaml: the top level is ['bridge', 'train']; it must be a mapping of bridge, train",
    ),
    (
        "run.yaml",
        "",
        "config 'run.yaml' is empty; give at least one of its sections (bridge, train), or no "
        "config file for the defaults",
    ),
    (
        "run.yaml",
        "# all commented out\n",
        "config 'run.yaml' is empty; give at least one of its sections "
        "(bridge, train), or no config file for the defaults",
    ),
    (
        "run.yaml",
        "train:\n  !!python/object:os.system {}\n",  # safe loading: a tag never builds an object
        "config 'run.yaml' is not valid YAML: line 2, column 3: could not determine a constructor for the "
        "tag 'tag:yaml.org,2002:python/object:os.system'",
    ),
    (
        "run.json",
        '{"train": {"lr": 0.1,}}',
        "config 'run.json' is not valid JSON: line 1, column 22: "
        "Expecting property name enclosed in double quotes",
    ),
    ("run.json", '{"train": {"lr": NaN}}', "run.json: train.lr is nan; it must be a finite number"),
]


@pytest.mark.parametrize(("name", "text", "message"), BAD_FILES)
def test_a_malformed_file_is_one_config_error_naming_it(tmp_path, name, text, message):
    assert refusal(tmp_path, text, name=name) == message


def test_a_missing_file_a_folder_and_a_non_utf8_file_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"^config file '.*nowhere\.yaml' does not exist$"):
        load_config(tmp_path / "nowhere.yaml")
    with pytest.raises(ConfigError, match=r"is not a file; give a YAML or JSON config file$"):
        load_config(tmp_path)
    (tmp_path / "latin1.yaml").write_bytes("train:\n  loss: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml' is not UTF-8 text \(line 2\); save it as UTF-8$"):
        load_config(tmp_path / "latin1.yaml")


def test_a_byte_order_mark_is_read_past(tmp_path):
    (tmp_path / "bom.yaml").write_bytes("\ufefftrain:\n  steps: 7\n".encode())
    assert load_config(tmp_path / "bom.yaml").train.steps == 7


# --- the property: any value for any key loads as its type or is refused naming the key --------------------


def _without_none(hint):
    args = typing.get_args(hint)
    return (next(a for a in args if a is not type(None)), True) if type(None) in args else (hint, False)


def _fields(cls: type, prefix: tuple[str, ...] = ()):
    """(path, annotation, Allowed) for every field of `cls` and of the configs nested in it."""
    hints = typing.get_type_hints(cls)
    for spec in dataclasses.fields(cls):
        path, hint = (*prefix, spec.name), hints[spec.name]
        yield path, hint, spec.metadata.get("allowed", Allowed())
        inner, _ = _without_none(hint)
        if dataclasses.is_dataclass(inner):
            yield from _fields(inner, path)


FIELDS = [(top, *field) for top in (RunConfig, VLMRunConfig) for field in _fields(top)]


def _conforms(hint, value) -> bool:
    hint, optional = _without_none(hint)
    if value is None:
        return optional
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint)
    if typing.get_origin(hint) is list:
        return type(value) is list and all(_conforms(typing.get_args(hint)[0], item) for item in value)
    if typing.get_origin(hint) is dict:
        return type(value) is dict and all(type(key) is str for key in value)
    if hint is float:
        return type(value) in (int, float) and math.isfinite(value)
    return type(value) is hint


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.integers(),
    st.integers(min_value=2**62, max_value=2**200).flatmap(lambda n: st.sampled_from([n, -n])),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from(
        ["1e-3", "5e3", "-2e1", "2.5", "nan", "inf", "", " ", "infonce", "bf16", "full", "q_proj"]
    ),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=4) | st.integers(0, 2), inner, max_size=3)
    ),
    max_leaves=6,
)


def _nested(path: tuple[str, ...], value) -> dict:
    for key in reversed(path):
        value = {key: value}
    return value


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(FIELDS), VALUES)
def test_any_value_for_any_key_loads_as_its_type_or_is_refused_naming_the_key(field, value):
    top, path, hint, allowed = field
    dotted = ".".join(path)
    try:
        config = from_dict(top, _nested(path, value), source="fuzz.yaml")
    except ConfigError as error:
        message = str(error)
        leaf = not dataclasses.is_dataclass(_without_none(hint)[0])
        assert (
            message.startswith(f"fuzz.yaml: {dotted}")
            if leaf
            else "fuzz.yaml" in message and dotted in message
        )
        return
    loaded = config
    for key in path:
        loaded = getattr(loaded, key)
    assert _conforms(hint, loaded), f"{dotted}: {value!r} loaded as {loaded!r}"
    if loaded is not None and not dataclasses.is_dataclass(loaded):
        assert allowed.admits(loaded) and not (allowed.check and allowed.check(loaded))
    if _conforms(hint, value):
        assert loaded == value  # a value of the right type is taken as it is


def _valid(hint, allowed: Allowed):
    """Values of `hint` inside `allowed`'s range: what the loader must accept unchanged."""
    hint, optional = _without_none(hint)
    if allowed.one_of:
        values = st.sampled_from(allowed.one_of)
    elif hint is bool:
        values = st.booleans()
    elif hint in (int, float):
        low = allowed.at_least if allowed.at_least is not None else allowed.above
        high = allowed.at_most if allowed.at_most is not None else allowed.below
        if hint is int:
            values = st.integers(low if low is not None else -(2**40), high if high is not None else 2**40)
        else:
            values = st.floats(low, high if high is not None else 1e9, allow_nan=False)
            values = values.filter(allowed.admits)
    elif hint is str:
        values = st.text(min_size=1, max_size=8).filter(str.strip)
    else:
        return None
    return values | st.none() if optional else values


VALID_FIELDS = [
    (top, path, hint, allowed)
    for top, path, hint, allowed in FIELDS
    if allowed.check is None and _valid(hint, allowed) is not None
]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_value_in_range_is_accepted_as_it_is(data):
    top, path, hint, allowed = data.draw(st.sampled_from(VALID_FIELDS))
    value = data.draw(_valid(hint, allowed))
    loaded = from_dict(top, _nested(path, value), source="fuzz.yaml")
    for key in path:
        loaded = getattr(loaded, key)
    assert loaded == value and type(loaded) is type(value)


# --- command-line arguments ----------------------------------------------------------------------------

BAD_ARGUMENTS = [
    (["serve", "idx", "--port", "70000"], "argument --port: '70000' is not a port number from 0 to 65535"),
    (["serve", "idx", "--port", "-1"], "argument --port: '-1' is not a port number from 0 to 65535"),
    (["search", "idx", "cat", "-k", "-1"], "argument -k: '-1' is not a whole number of at least 1"),
    (["search", "idx", "cat", "-k", "0"], "argument -k: '0' is not a whole number of at least 1"),
    (["search", "idx", "cat", "-k", "ten"], "argument -k: 'ten' is not a whole number of at least 1"),
    (
        ["index", "f", "--model", "m", "--out", "o", "--batch-size", "-3"],
        "argument --batch-size: '-3' is not a whole number of at least 1",
    ),
    (
        ["index", "f", "--model", "m", "--out", "o", "--workers", "-1"],
        "argument --workers: '-1' is not a whole number of at least 0",
    ),
    (
        ["index", "f", "--model", "m", "--out", "o", "--device", "bogus"],
        "argument --device: 'bogus' is not a device; give cpu, cuda, cuda:N (N: the GPU's number) or mps",
    ),
    (
        ["index", "f", "--model", "m", "--out", "o", "--device", "cuda:x"],
        "argument --device: 'cuda:x' is not a device",
    ),
    (
        ["index", "f", "--model", "m", "--out", "a_file"],
        "argument --out: 'a_file' is an existing file; give a directory, new or existing",
    ),
    (["train", "--data", "synthetic:8", "--out", "a_file"], "argument --out: 'a_file' is an existing file"),
    (
        ["train", "--data", "synthetic:8", "--out", "o", "--steps", "-5"],
        "argument --steps: '-5' is not a whole number of at least 1",
    ),
    (
        ["train-vlm", "--data", "synthetic:8", "--out", "a_file"],
        "argument --out: 'a_file' is an existing file",
    ),
    (
        ["train-vlm", "--data", "synthetic:8", "--out", "o", "--steps", "0"],
        "argument --steps: '0' is not a whole",
    ),
    (["export-llava", "m", "a_file"], "argument out: 'a_file' is an existing file"),
    (["demo-vlm", "--out", "a_file"], "argument --out: 'a_file' is an existing file"),
    (["demo", "--scenes", "0"], "argument --scenes: '0' is not a whole number of at least 1"),
    (
        ["demo", "grounding", "--eval-scenes", "-2"],
        "argument --eval-scenes: '-2' is not a whole number of at least 1",
    ),
    (["demo", "--out", "a_file"], "argument --out: 'a_file' is an existing file"),
    (
        ["segment", "i.png", "--classes", "a", "--out", "s.png", "--threshold", "nan"],
        "argument --threshold: 'nan' is not a cosine; give a number from -1 to 1",
    ),
    (
        ["segment", "i.png", "--classes", "a", "--out", "s.png", "--threshold", "1.5"],
        "argument --threshold: '1.5' is not a cosine",
    ),
    (
        ["segment", "i.png", "--classes", "a", "--out", "."],
        "argument --out: '.' is a directory; give an image file",
    ),
    (
        ["segment", "i.png", "--classes", "a", "--out", "no/such/s.png"],
        "argument --out: folder 'no/such' of 'no/such/s.png' does not exist; create it first",
    ),
    (
        ["ground", "i.png", "a cat", "--refine", "-1"],
        "argument --refine: '-1' is not a whole number of at least 0",
    ),
    (
        ["ground", "i.png", "a cat", "--shifts", "0"],
        "argument --shifts: '0' is not a whole number of at least 1",
    ),
    (
        ["ground", "i.png", "a cat", "--scale", "0"],
        "argument --scale: '0' is not a whole number of at least 1",
    ),
    (
        ["eval", "segmentation", "--model", "m", "--data", "d", "--threshold=-inf"],
        "argument --threshold: '-inf' is not a cosine",
    ),
    (
        ["chat", "hi", "--model", "m", "--max-new-tokens", "0"],
        "argument --max-new-tokens: '0' is not a whole",
    ),
    (
        ["train-vlm", "--data", "synthetic:8", "--out", "o", "--stage", "3"],
        "argument --stage: invalid choice: 3",
    ),
]


@pytest.mark.parametrize(
    ("argv", "message"), BAD_ARGUMENTS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD_ARGUMENTS]
)
def test_a_bad_argument_is_refused_by_argparse_naming_the_option(
    argv, message, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("not a directory")
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert f"dinobridge {argv[0]}" in error and message in error
    assert "Traceback" not in error


def test_good_arguments_parse_to_their_values(tmp_path, monkeypatch):
    from bridge.cli import build_parser

    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(
        [
            "index",
            "f",
            "--model",
            "m",
            "--out",
            "new",
            "--device",
            "cuda:1",
            "--batch-size",
            "8",
            "--workers",
            "0",
        ]
    )
    assert (args.device, args.batch_size, args.workers, args.out) == ("cuda:1", 8, 0, "new")
    args = build_parser().parse_args(
        ["segment", "i.png", "--classes", "a", "--out", "s.png", "--threshold", "-0.2"]
    )
    assert (args.threshold, args.refine, args.shifts) == (-0.2, 10, 2)
    assert build_parser().parse_args(["search", "idx", "cat"]).k == 10
