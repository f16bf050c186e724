"""Data readers (training/data.py): every record's fields and types are checked, naming the file and the
line (or entry) and the fix; a UTF-8 file with Excel's byte-order mark is read, any other encoding is
refused by name; `dinobridge train` turns each of these into one line and exit 2."""

from __future__ import annotations

import json

import pytest

from bridge.cli import main
from training.data import DataError, load_conversations, load_pairs


@pytest.fixture
def images(tmp_path):
    """Two (empty) image files and a sub-folder beside the data files: readers only check that they exist."""
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder").mkdir()
    return tmp_path


GOOD_LINE = json.dumps({"image": "a.jpg", "caption": "a red circle"})


@pytest.mark.parametrize(
    "record, message",
    [
        ('{"image": 5, "caption": "x"}', r'"image" must be an image path \(a non-empty string\), got 5'),
        ('{"image": null, "caption": "x"}', '"image" must be an image path .*got null'),
        ('{"image": "", "caption": "x"}', '"image" must be an image path .*got ""'),
        ('{"image": ["a.jpg"], "caption": "x"}', r'got \["a\.jpg"\]'),
        ('{"caption": "x"}', 'has no "image" key'),
        ('["a.jpg", "x"]', r"expected an object .*got \[\"a\.jpg\", \"x\"\]"),
        ('{"image": "a.jpg", "captions": 5}', r'"captions" list of non-empty strings, got 5'),
        ('{"image": "a.jpg", "captions": ["ok", 3]}', r'got \["ok", 3\]'),
        ('{"image": "a.jpg", "caption": null}', "got null"),
        ('{"image": "a.jpg"}', "it has neither"),
        ('{"image": "folder", "caption": "x"}', "image 'folder' is a folder"),
    ],
)
def test_a_bad_jsonl_record_is_named_by_file_and_line(images, record, message):
    data = images / "pairs.jsonl"
    data.write_text(f"{GOOD_LINE}\n\n{record}\n")  # the blank line still counts: the record is line 3
    with pytest.raises(DataError, match=rf"pairs\.jsonl:3: .*{message}"):
        load_pairs(str(data))


def write_llava(folder, entry) -> str:
    good = {
        "image": "a.jpg",
        "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}],
    }
    (folder / "llava.json").write_text(json.dumps([good, entry]))
    return str(folder / "llava.json")


def turns(*pairs) -> list:
    return [{"from": speaker, "value": value} for speaker, value in pairs]


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"image": 5, "conversations": turns(("human", "<image>"), ("gpt", "x"))}, "got 5"),
        ({"image": None, "conversations": turns(("gpt", "x"))}, "leave it out for a text-only.*got null"),
        ({"image": [5], "conversations": turns(("human", "<image>"), ("gpt", "x"))}, '"image" must be an'),
        ({"image": "a.jpg", "conversations": "hello"}, r'expected \{"image": \.\.\., "conversations"'),
        ("just text", 'got "just text"'),
        ({"conversations": [{"from": ["human"], "value": "x"}]}, r'turn 0: needs "from".*got \{"from": \['),
        ({"conversations": ["hello"]}, 'turn 0: needs "from".*got "hello"'),
        ({"conversations": [{"from": "gpt", "value": 7}]}, 'turn 0: needs "from" .*and a "value" string'),
    ],
)
def test_a_malformed_llava_entry_is_named_by_file_and_entry(images, entry, message):
    with pytest.raises(DataError, match=rf"llava\.json: entry 1.*{message}"):
        load_conversations(write_llava(images, entry))


def test_a_llava_entry_without_an_image_is_a_text_only_conversation(images):
    conversations = load_conversations(
        write_llava(images, {"conversations": turns(("human", "hi"), ("gpt", "x"))})
    )
    assert [len(c.images) for c in conversations] == [1, 0]


COCO_IMAGES = [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}]


@pytest.mark.parametrize(
    "coco, message",
    [
        (
            {"images": COCO_IMAGES, "annotations": ["a cat"]},
            r'annotation #0: expected \{"image_id".*got "a cat"',
        ),
        (
            {"images": COCO_IMAGES, "annotations": [{"caption": "a cat"}]},
            "annotation #0: names image_id null",
        ),
        ({"images": COCO_IMAGES, "annotations": [{"image_id": [1], "caption": "x"}]}, r"image_id \[1\]"),
        ({"images": COCO_IMAGES, "annotations": [{"image_id": 3, "caption": "x"}]}, "image_id 3, not an id"),
        ({"images": COCO_IMAGES, "annotations": [{"image_id": 1, "caption": 4}]}, "annotation #0: needs a"),
        ({"images": ["a.jpg"], "annotations": []}, r'image #0: expected \{"id": 1, "file_name"'),
        ({"images": [{"id": 1}], "annotations": []}, "image #0: expected"),
        (
            {"images": [{"id": 1, "file_name": 5}], "annotations": [{"image_id": 1, "caption": "x"}]},
            '"file_name" must',
        ),
        (
            {"images": COCO_IMAGES, "annotations": {"0": {}}},
            "needs an object with 'images' and 'annotations' lists",
        ),
        ([COCO_IMAGES], "record #0: expected an object"),
        ({"images": COCO_IMAGES}, r"not a COCO captions file: .*or a list of \{\"image\""),
    ],
)
def test_a_malformed_coco_file_names_the_annotation_or_image(images, coco, message):
    (images / "captions.json").write_text(json.dumps(coco))
    with pytest.raises(DataError, match=rf"captions\.json: .*{message}"):
        load_pairs(str(images / "captions.json"))


def test_a_json_list_of_records_reads_as_a_jsonl_of_them(images):
    records = [{"image": "a.jpg", "caption": "a red circle"}, {"image": "b.jpg", "captions": ["x", "y"]}]
    (images / "pairs.json").write_text(json.dumps(records))
    (images / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    from_json, from_jsonl = load_pairs(str(images / "pairs.json")), load_pairs(str(images / "pairs.jsonl"))
    assert [(p.image, p.captions) for p in from_json] == [(p.image, p.captions) for p in from_jsonl]
    assert [p.captions for p in from_json] == [["a red circle"], ["x", "y"]]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be"])
def test_a_utf16_file_with_its_byte_order_mark_is_read(images, encoding):
    data = images / "pairs.csv"
    text = "image,caption\na.jpg,un café rouge\n"
    data.write_bytes(("\ufeff" + text if encoding == "utf-16-be" else text).encode(encoding))
    assert [p.captions for p in load_pairs(str(data))] == [["un café rouge"]]


def test_a_csv_header_typed_with_spaces_after_the_commas_is_read(images):
    data = images / "pairs.csv"
    data.write_text('image, caption\na.jpg, a red circle\nb.jpg, "a dog, running"\n')
    assert [(p.image, p.captions) for p in load_pairs(str(data))] == [
        (str(images / "a.jpg"), ["a red circle"]),
        (str(images / "b.jpg"), ["a dog, running"]),
    ]


def test_a_csv_saved_by_excel_with_a_byte_order_mark_is_read(images):
    data = images / "pairs.csv"
    data.write_text('image,caption\na.jpg,un café rouge\nb.jpg,"a dog, running"\n', encoding="utf-8-sig")
    assert data.read_bytes().startswith(b"\xef\xbb\xbf")
    pairs = load_pairs(str(data))
    assert [(p.image.rsplit("/", 1)[1], p.captions) for p in pairs] == [
        ("a.jpg", ["un café rouge"]),
        ("b.jpg", ["a dog, running"]),
    ]
    jsonl = images / "pairs.jsonl"  # Notepad writes the mark too
    jsonl.write_text(GOOD_LINE + "\n", encoding="utf-8-sig")
    assert load_pairs(str(jsonl))[0].captions == ["a red circle"]


@pytest.mark.parametrize("name", ["pairs.csv", "pairs.jsonl"])
def test_a_latin1_file_is_refused_naming_the_line_and_byte_and_the_fix(images, name):
    latin = json.dumps({"image": "b.jpg", "caption": "un café rouge"}, ensure_ascii=False)
    text = {
        "pairs.csv": "image,caption\na.jpg,a red circle\nb.jpg,un café rouge\n",
        "pairs.jsonl": f"{GOOD_LINE}\n{GOOD_LINE}\n{latin}\n",
    }[name]
    data = images / name
    data.write_bytes(text.encode("latin-1"))
    offset = text.encode("latin-1").index(b"\xe9")
    with pytest.raises(DataError) as refused:
        load_pairs(str(data))
    assert f"{name}:3: not UTF-8 text (byte 0xe9 at offset {offset:,})" in str(refused.value)
    assert "re-save the file as UTF-8" in str(refused.value)


@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.csv", "captions.json", "llava.json"])
def test_an_empty_data_file_is_named(images, name):
    (images / name).write_text("\n  \n")
    read = load_conversations if name == "llava.json" else load_pairs
    with pytest.raises(DataError, match=rf"data file '.*{name}' is empty"):
        read(str(images / name))


def test_csv_rows_with_too_many_or_too_few_cells_are_refused_not_cut(images):
    data = images / "pairs.csv"
    # The quoted caption spans lines 2-3, so the unquoted comma's row is line 4.
    data.write_text('image,caption\na.jpg,"two\nlines"\nb.jpg,a dog, running\n')
    with pytest.raises(DataError, match=r"pairs\.csv:4: has more cells than the header's 2 columns; put a"):
        load_pairs(str(data))
    data.write_text("image,caption\na.jpg,one\nb.jpg\n")
    with pytest.raises(DataError, match=r"pairs\.csv:3: has no 'caption' cell"):
        load_pairs(str(data))


def test_a_caption_holding_a_unicode_line_separator_stays_one_record(images):
    data = images / "pairs.jsonl"
    record = json.dumps({"image": "a.jpg", "caption": "a red\u2028circle"}, ensure_ascii=False)
    data.write_text(record + "\n" + json.dumps({"image": "b.jpg", "caption": "x"}) + "\n", encoding="utf-8")
    pairs = load_pairs(str(data))
    assert [p.captions for p in pairs] == [["a red\u2028circle"], ["x"]]
    assert pairs[1].origin.endswith("pairs.jsonl:2")


def test_an_image_root_that_is_not_a_folder_is_named(images):
    (images / "pairs.jsonl").write_text(GOOD_LINE + "\n")
    with pytest.raises(DataError, match="image root '.*nowhere' is not a folder"):
        load_pairs(str(images / "pairs.jsonl"), image_root=str(images / "nowhere"))


def test_train_prints_one_line_naming_the_record_and_leaves_out_unmade(images, capsys):
    (images / "pairs.jsonl").write_text(GOOD_LINE + "\n" + '{"image": null, "caption": "x"}\n')
    out = images / "run"
    argv = ["train", "--data", str(images / "pairs.jsonl"), "--out", str(out), "--steps", "1"]
    assert main(argv) == 2
    stderr = capsys.readouterr().err  # above the error: the text tower's loading progress
    error = stderr.strip().splitlines()[-1]
    assert "Traceback" not in stderr
    assert error.startswith("dinobridge train: error: ") and 'pairs.jsonl:2: "image" must be' in error
    assert not out.exists()
