"""Webdataset shards as text-route training data (training/shards.py): synthetic scenes written as
img2dataset writes them, a corrupt image and captionless samples among them, trained from on 1 and on 2
processes."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import yaml

from bridge.config import RunConfig, load_config, to_dict
from bridge.model import TextBridge
from bridge.synthetic import SyntheticWorld
from tests.conftest import tiny_bridge_config
from tests.test_distributed import accelerate_launch
from training.align import AlignmentData, sample_batch, train_text_bridge
from training.cache import FeatureCache
from training.data import DataError
from training.shards import shard_urls, stream_shards

GOOD = 30  # usable samples, 15 a shard
# The bad samples, in the second shard, and the reason each is reported with.
BAD = {
    "corrupt": "truncated",
    "nocaption": "no caption",
    "blank": "blank caption",
}


def write_tars(folder: Path, shards: list[list[tuple[str, bytes]]]) -> list[str]:
    """Each list of (member name, bytes) as a tar shard of `folder`, 00000.tar, 00001.tar, ...; their paths."""
    folder.mkdir()
    paths = [str(folder / f"{number:05d}.tar") for number in range(len(shards))]
    for path, members in zip(paths, shards, strict=True):
        with tarfile.open(path, "w") as archive:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return paths


def image_bytes(image, format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def write_shards(folder: Path) -> dict[str, str]:
    """Two shards of synthetic scenes: JPEG + .txt in the first, PNG + .json caption in the second, which
    also holds the BAD samples. Returns each good sample's origin ("shard:key") -> its caption."""
    scenes = SyntheticWorld(0).scenes(0, GOOD + len(BAD))
    members: list[list[tuple[str, bytes]]] = [[], []]
    captions = {}
    for index, scene in enumerate(scenes[:GOOD]):
        key, caption = f"{index:08d}", scene.captions(1)[0]
        number = index // 15
        if number == 0:
            members[0] += [
                (f"{key}.jpg", image_bytes(scene.render(), "JPEG")),
                (f"{key}.txt", caption.encode()),
            ]
        else:
            label = json.dumps({"caption": caption, "url": "x"}).encode()
            members[1] += [(f"{key}.png", image_bytes(scene.render(), "PNG")), (f"{key}.json", label)]
        captions[(number, key)] = caption
    photo = image_bytes(scenes[-1].render(), "JPEG")
    members[1] += [
        ("corrupt.jpg", photo[: len(photo) // 2]),
        ("corrupt.txt", b"a picture that was cut short"),
        ("nocaption.jpg", photo),
        ("nocaption.json", b'{"url": "http://example.com/a.jpg"}'),
        ("blank.jpg", photo),
        ("blank.txt", b"  \n"),
    ]
    shards = write_tars(folder, members)
    return {f"{shards[number]}:{key}": caption for (number, key), caption in captions.items()}


def run_config(tmp_path: Path, cache: str) -> Path:
    config = RunConfig(bridge=tiny_bridge_config(width=32, num_heads=2))
    train = config.train
    train.steps, train.batch_size, train.held_out, train.lr, train.warmup_steps = 6, 8, 6, 1e-2, 1
    train.eval_every, train.checkpoint_every = 0, 3
    train.cache_dir = str(tmp_path / cache)
    path = tmp_path / f"{cache}.yaml"
    path.write_text(yaml.safe_dump(to_dict(config)))
    return path


def test_shards_are_named_by_a_brace_range_a_list_file_or_a_folder(tmp_path: Path) -> None:
    write_shards(tmp_path / "shards")
    expected = [str(tmp_path / "shards" / "00000.tar"), str(tmp_path / "shards" / "00001.tar")]
    assert shard_urls(str(tmp_path / "shards" / "{00000..00001}.tar")) == expected
    assert shard_urls(str(tmp_path / "shards")) == expected
    listing = tmp_path / "shards.txt"
    listing.write_text("# train shards\nshards/00000.tar\n\nshards/00001.tar\n")
    assert shard_urls(str(listing)) == expected
    with pytest.raises(DataError, match=r"shard '.*00002.tar' \(and 1 more\) of .* does not exist"):
        shard_urls(str(tmp_path / "shards" / "{00000..00003}.tar"))


def test_every_good_sample_once_an_epoch_and_the_bad_ones_reported(tmp_path: Path, monkeypatch) -> None:
    good = write_shards(tmp_path / "shards")
    spec = str(tmp_path / "shards" / "{00000..00001}.tar")
    config = load_config(run_config(tmp_path, "cache"))
    bridge = TextBridge.from_config(config.bridge)
    data = AlignmentData.prepare(bridge, spec, config.train, tmp_path / "cache", progress=False)

    def origins(split) -> list[str]:
        return [pair.origin for pair in split.features.pairs]

    train, held_out = origins(data.train), origins(data.held_out)
    assert len(held_out) == 6 and len(train) == GOOD - 6
    assert sorted(train + held_out) == sorted(good)  # each good sample once, none of the bad ones
    captions = {pair.origin: pair.captions for pair in data.train.features.pairs}
    assert all(captions[origin] == [good[origin]] for origin in train)
    # One epoch of batches (24 training samples, 8 a batch) uses each training sample exactly once.
    seen = [train[i] for batch in range(3) for i in sample_batch(data.train, config.train, batch)[0].tolist()]
    assert sorted(seen) == sorted(train)
    second = str(tmp_path / "shards" / "00001.tar")
    reported = dict(data.skipped)
    assert set(reported) == {f"{second}:{key}" for key in BAD}
    for key, reason in BAD.items():
        assert reason in reported[f"{second}:{key}"], reported

    # A second run reads the manifest the first one left beside the features: the shards are not read.
    def no_reading(url):
        raise AssertionError(f"read shard {url} again")

    monkeypatch.setattr("training.shards._shard_records", no_reading)
    again = AlignmentData.prepare(bridge, spec, config.train, tmp_path / "cache", progress=False)
    assert origins(again.train) == train and dict(again.skipped) == reported


def test_a_shard_cut_short_keeps_the_samples_before_the_cut_and_is_reported(
    tmp_path: Path, tiny_bridge
) -> None:
    good = write_shards(tmp_path / "shards")
    first = tmp_path / "shards" / "00000.tar"
    with tarfile.open(first) as archive:
        member = archive.getmembers()[10]  # 00000005.jpg: samples 0-4 come before it
    whole = first.read_bytes()
    for cut, reason in (
        (member.offset_data + member.size // 2, "shard unreadable past this point (unexpected end of data)"),
        (member.offset, "shard cut short (no end-of-archive blocks)"),  # tarfile takes this for the end
    ):
        first.write_bytes(whole[:cut])
        cache = FeatureCache(tmp_path / f"cache-{cut}", tiny_bridge.encoder)
        pairs, skipped = stream_shards(str(first), cache, progress=False)
        assert [pair.origin for pair in pairs] == [o for o in good if o.startswith(f"{first}:")][:5]
        assert len(skipped) == 1 and skipped[0][0] == str(first) and skipped[0][1].startswith(reason)


def test_shards_without_the_feature_cache_are_refused(tmp_path: Path, tiny_bridge) -> None:
    write_shards(tmp_path / "shards")
    config = load_config(run_config(tmp_path, "cache")).train
    config.cache = False
    with pytest.raises(ValueError, match="read through the feature cache; train.cache: false takes file"):
        AlignmentData.prepare(tiny_bridge, str(tmp_path / "shards"), config, tmp_path / "cache")


@pytest.mark.slow
def test_two_processes_train_from_shards_as_one_process_does(tmp_path: Path) -> None:
    write_shards(tmp_path / "shards")
    spec = str(tmp_path / "shards")  # the folder
    # Separate caches: the 2-process run streams the shards itself (its main process), the other reads.
    _, single = train_text_bridge(
        load_config(run_config(tmp_path, "one")), spec, tmp_path / "a", progress=False
    )
    command = ["train", "--config", str(run_config(tmp_path, "two")), "--data", spec, "--out", "b"]
    printed = accelerate_launch(2, *command, cwd=tmp_path)
    logged = [json.loads(line) for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    # Same samples, same global batches: the same loss at every step.
    assert max(abs(a - b) for a, b in zip(single.losses, [e["loss"] for e in logged], strict=True)) < 1e-4
    # The main process alone reports the run, the three bad samples once.
    for line in (
        "skipped 3 unreadable",
        ":corrupt: truncated",
        ":nocaption: no caption",
        ":blank: blank caption",
    ):
        assert printed.count(line) == 1, printed
