"""Tests for `dinobridge serve` (bridge/serve.py): every endpoint, every refusal, and an index updated under
a running app.

The app runs in this process through FastAPI's test client, over an index of photos made here with the tiny
bridge from conftest.py. Each test asserts what a client relies on: results equal to ImageIndex.search's,
bytes equal to the file's, a 4xx with a reason that names the problem, a new generation found without a
restart.
"""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from test_index import make_photos, png_claiming_size, sideways_jpeg

import bridge.serve as serve_module
from bridge.cli import main as dinobridge
from bridge.grounding import heatmaps, overlay_heatmap
from bridge.images import load_image
from bridge.index import ImageIndex
from bridge.numpy_text import TextQueryEncoder
from bridge.search import BACKENDS
from bridge.serve import Limits, check_exposure, create_app, image_id

LOCAL = "http://127.0.0.1:8000"  # what a browser on this machine sends as the Host


def build(folder: Path, bridge, out: Path, **options) -> ImageIndex:
    return ImageIndex.build(folder, bridge, out, **{"workers": 0, "progress": False, **options})


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_bridge):
    """(client, index, photo folder) over 12 photos and one sideways JPEG; the app is never changed."""
    root = tmp_path_factory.mktemp("served")
    folder = root / "photos"
    make_photos(folder, 12)
    (folder / "sideways.jpg").write_bytes(sideways_jpeg())
    (root / "secret.txt").write_text("not in the index")
    index = build(folder, tiny_bridge, root / "index")
    app = create_app(
        root / "index", bridge=tiny_bridge, limits=Limits(upload_bytes=200_000, k=10, results=12)
    )
    return TestClient(app, base_url=LOCAL), index, folder


def relative(index: ImageIndex, found: list[tuple[str, float]]) -> list[str]:
    return [str(Path(path).relative_to(index.root).as_posix()) for path, _ in found]


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


# --- searches -------------------------------------------------------------------------------------------


def test_text_search_pages_through_what_the_index_finds(served) -> None:
    client, index, _ = served
    expected = index.search(text=["a red square", "noise"], minus="people", k=7)
    response = client.get("/api/search", params={"q": ["a red square", "noise"], "minus": "people", "k": 7})
    assert response.status_code == 200
    body = response.json()
    assert [hit["path"] for hit in body["results"]] == relative(index, expected)
    np.testing.assert_allclose([hit["score"] for hit in body["results"]], [s for _, s in expected], atol=1e-5)
    assert (body["searched"], body["space"], body["generation"], body["more"]) == (13, "text", 1, True)
    assert body["seconds"] > 0

    page = client.get(
        "/api/search", params={"q": ["a red square", "noise"], "minus": "people", "k": 3, "offset": 2}
    )
    assert [hit["path"] for hit in page.json()["results"]] == relative(index, expected)[2:5]
    last = client.get("/api/search", params={"q": "a red square", "k": 5, "offset": 7}).json()
    assert len(last["results"]) == 5 and last["more"] is False  # 12 = the limit on offset + k

    hit = body["results"][0]
    assert hit["id"] == image_id(hit["path"])
    assert hit["original"] == f"/api/images/{hit['id']}/original"
    assert hit["thumbnail"].startswith(f"/api/images/{hit['id']}/thumbnail?v=")
    assert hit["heatmap"].startswith(f"/api/images/{hit['id']}/heatmap?q=a%20red%20square%20noise&v=")


def test_more_like_this_searches_dinov2_space_from_an_indexed_image(served) -> None:
    client, index, folder = served
    name = "trips/photo003.png"
    body = client.get("/api/search", params={"like": image_id(name), "k": 4}).json()
    expected = index.search(like=name, k=4)  # its stored embeddings: no decoding, no model
    assert [hit["path"] for hit in body["results"]] == relative(index, expected) and expected
    assert relative(index, expected) == relative(index, index.search(image=folder / name, k=4))
    assert body["results"][0]["path"] == name and body["results"][0]["score"] == pytest.approx(1, abs=2e-3)
    assert body["space"] == "image" and "heatmap" not in body["results"][0]  # no text to show

    combined = client.get("/api/search", params={"like": image_id(name), "q": "blue", "k": 4}).json()
    assert combined["space"] == "text"
    assert [h["path"] for h in combined["results"]] == relative(
        index, index.search(text="blue", like=name, k=4)
    )


def test_an_uploaded_image_searches_like_the_same_image_indexed(served) -> None:
    client, index, folder = served
    name = "photo001.png"
    upload = {"image": ("mine.png", (folder / name).read_bytes(), "image/png")}
    by_upload = client.post("/api/search", files=upload, params={"k": 4})
    assert by_upload.status_code == 200
    by_id = client.get("/api/search", params={"like": image_id(name), "k": 4})
    assert [h["path"] for h in by_upload.json()["results"]] == [h["path"] for h in by_id.json()["results"]]

    with_text = client.post(
        "/api/search", files=upload, params={"q": "a red square", "minus": "blue", "k": 4}
    )
    expected = index.search(text="a red square", image=load_image(folder / name), minus="blue", k=4)
    assert [h["path"] for h in with_text.json()["results"]] == relative(index, expected)


def test_text_queries_are_embedded_once_each_by_the_numpy_twin(
    served, tiny_bridge, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, index, _ = served
    tiny_bridge.save_pretrained(tmp_path / "model")
    client = TestClient(create_app(index.directory, tmp_path / "model"), base_url=LOCAL)
    embedded, twin_encode = [], TextQueryEncoder.encode_texts

    def counted(self, texts, **options):
        embedded.append(list(texts))
        return twin_encode(self, texts, **options)

    monkeypatch.setattr(TextQueryEncoder, "encode_texts", counted)
    pages = [
        client.get(
            "/api/search", params={"q": "a red square", "minus": "blue", "k": 3, "offset": offset}
        ).json()
        for offset in (0, 3, 6)
    ]
    assert embedded == [["a red square"], ["blue"]]  # paging asks for the same search again: remembered
    expected = index.search(text="a red square", minus="blue", k=9)  # the torch tower, in this process
    found = [(hit["path"], hit["score"]) for page in pages for hit in page["results"]]
    assert [path for path, _ in found] == relative(index, expected)
    np.testing.assert_allclose([s for _, s in found], [s for _, s in expected], atol=1e-5)


def test_a_search_asked_again_is_answered_from_memory_for_its_generation(
    served, tiny_bridge, monkeypatch
) -> None:
    _, index, folder = served
    searches = serve_module.RememberedSearches(
        serve_module.RememberedTexts(tiny_bridge, None), threading.Lock()
    )
    snapshot = serve_module.Snapshot(index, (1, 2, 3), {}, "exact")
    asked = [  # (texts, minus, like)
        (["a red square"], [], []),
        (["blue"], ["people"], []),
        ([], [], ["trips/photo003.png"]),
        (["noise"], [], ["photo001.png"]),
    ]
    alone = [index.search(text=texts, minus=minus, like=like, k=5) for texts, minus, like in asked]
    lookups, nearest = [], ImageIndex._nearest

    def counted(self, space, query, k, backend):
        lookups.append(space)
        return nearest(self, space, query, k, backend)

    monkeypatch.setattr(ImageIndex, "_nearest", counted)
    for (texts, minus, like), expected in zip(asked, alone, strict=True):
        found = searches.search(snapshot, texts, minus, like, None, 5)
        assert [path for path, _ in found] == [path for path, _ in expected]
        np.testing.assert_allclose([s for _, s in found], [s for _, s in expected], atol=1e-5)
        assert searches.search(snapshot, texts, minus, like, None, 3) == found[:3]  # a shallower page
    assert lookups == ["text", "text", "image", "text"]  # each searched once

    searches.search(snapshot, ["blue"], ["people"], [], None, 8)  # deeper than remembered
    searches.search(serve_module.Snapshot(index, (1, 2, 4), {}, "exact"), ["blue"], ["people"], [], None, 3)
    upload = load_image(folder / "photo001.png")
    searches.search(snapshot, [], [], [], upload, 3)
    searches.search(snapshot, [], [], [], upload, 3)  # an upload is never remembered
    assert len(lookups) == 8
    with pytest.raises(ValueError, match="not-indexed.png"):
        searches.search(snapshot, ["a red square"], [], ["not-indexed.png"], None, 5)


def test_new_texts_of_concurrent_requests_are_embedded_together_at_most_one_run_a_core(tiny_bridge):
    class SlowTwin:  # the NumPy twin's interface, with each call recorded and long enough to queue behind
        def __init__(self):
            self.calls, self.running, self.most, self.lock = [], 0, 0, threading.Lock()

        def encode_texts(self, texts):
            with self.lock:
                self.calls.append(list(texts))
                self.running += 1
                self.most = max(self.most, self.running)
            time.sleep(0.05)
            with self.lock:
                self.running -= 1
            return np.stack([np.full(4, float(len(text)), np.float32) for text in texts])

    twin = SlowTwin()
    queries = serve_module.RememberedTexts(tiny_bridge, twin, runs=2)
    asked = [[f"text {i}", "shared"] if i % 3 == 0 else [f"text {i}"] for i in range(24)]
    answers = [None] * len(asked)

    def ask(i):
        answers[i] = queries.encode_texts(asked[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asked))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for texts, rows in zip(asked, answers, strict=True):
        np.testing.assert_array_equal(rows[:, 0], [len(text) for text in texts])
    embedded = [text for call in twin.calls for text in call]
    assert sorted(embedded) == sorted({text for texts in asked for text in texts})  # each text once
    assert twin.most == 2 and len(twin.calls) < len(embedded)  # two runs at a time, packing the rest
    calls = len(twin.calls)
    assert queries.encode_texts("shared")[0, 0] == 6.0 and len(twin.calls) == calls  # remembered


# --- files by id ----------------------------------------------------------------------------------------


def test_thumbnails_are_upright_small_jpegs_cached_beside_the_index(
    served, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, index, _ = served
    response = client.get(f"/api/images/{image_id('sideways.jpg')}/thumbnail")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    thumbnail = Image.open(io.BytesIO(response.content))
    assert thumbnail.size == (20, 40)  # stored 40x20 with EXIF orientation 6: upright it stands
    top, bottom = np.asarray(thumbnail)[:10].mean((0, 1)), np.asarray(thumbnail)[-10:].mean((0, 1))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # red on top, blue at the bottom

    cache = index.directory.with_name(index.directory.name + ".thumbnails")
    assert len(list(cache.rglob("*.jpg"))) == 1  # beside the index: the index directory is its writer's
    assert not any("thumbnail" in p.name for p in index.directory.rglob("*"))
    monkeypatch.setattr(serve_module, "load_image", lambda *_, **__: pytest.fail("decoded twice"))
    again = client.get(f"/api/images/{image_id('sideways.jpg')}/thumbnail")
    assert again.content == response.content


def test_big_photos_get_thumbnails_at_most_the_limit_on_their_longer_side(
    tmp_path: Path, tiny_bridge
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (900, 300), (0, 128, 0)).save(folder / "wide.png")
    build(folder, tiny_bridge, tmp_path / "index")
    client = TestClient(create_app(tmp_path / "index", bridge=tiny_bridge), base_url=LOCAL)
    thumbnail = Image.open(io.BytesIO(client.get(f"/api/images/{image_id('wide.png')}/thumbnail").content))
    assert thumbnail.size == (320, 107)


def test_originals_are_served_by_id_byte_for_byte(served) -> None:
    client, _, folder = served
    for name in ["photo002.jpg", "trips/photo003.png"]:
        response = client.get(f"/api/images/{image_id(name)}/original")
        assert response.status_code == 200
        assert response.content == (folder / name).read_bytes()
        assert response.headers["content-type"] == ("image/jpeg" if name.endswith("jpg") else "image/png")


@pytest.mark.parametrize(
    "url",
    [
        "/api/images/../../secret.txt",
        "/api/images/..%2F..%2Fsecret.txt/original",
        "/api/images/%2e%2e%2f%2e%2e%2fsecret.txt/original",
        "/api/images/{traversal}/original",  # the id a path outside the folder would have, were it indexed
        "/api/images/photo002.jpg/original",  # a path, even one that is indexed, is not an id
        "/static/../../../secret.txt",
        "/static/..%2F..%2F..%2Fsecret.txt",
        "/static/%2e%2e/serve.py",
        "/api/original?path=../secret.txt",
    ],
)
def test_no_request_reaches_a_file_by_its_path(served, url: str) -> None:
    client, _, _ = served
    response = client.get(url.format(traversal=image_id("../secret.txt")))
    assert response.status_code == 404
    assert b"not in the index" not in response.content and b"import" not in response.content
    assert isinstance(response.json()["detail"], str)


def test_heatmap_is_the_grounding_overlay_of_the_text(served, tiny_bridge) -> None:
    client, _, folder = served
    name = "photo002.jpg"
    response = client.get(f"/api/images/{image_id(name)}/heatmap", params={"q": "a red square"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    served_map = np.asarray(Image.open(io.BytesIO(response.content)))
    image = load_image(folder / name)
    expected = np.asarray(overlay_heatmap(image, heatmaps(tiny_bridge, image, ["a red square"])[0]))
    assert served_map.shape == expected.shape == (36, 48, 3)
    assert np.abs(served_map.astype(int) - expected).max() <= 1


def test_status_says_what_is_served(served) -> None:
    client, index, _ = served
    status = client.get("/api/status").json()
    assert status["images"] == 13 and status["generation"] == 1 and status["backend"] == "exact"
    assert status["fingerprint"] == index.fingerprint and status["reload_error"] is None


def test_a_large_index_is_searched_through_faiss_built_before_the_first_query(
    served, tiny_bridge, tmp_path, monkeypatch
) -> None:
    _, index, _ = served
    monkeypatch.setattr(serve_module, "FLAT_UP_TO", 5)  # "large": over 5 images
    client = TestClient(
        create_app(index.directory, bridge=tiny_bridge, thumbnail_dir=tmp_path), base_url=LOCAL
    )

    def build_again(*args):
        raise AssertionError("the back-end is built when the generation is opened, not by a query")

    monkeypatch.setattr(BACKENDS["faiss"], "build", build_again)
    assert client.get("/api/status").json()["backend"] == "faiss"
    for params in [{"q": "a red square"}, {"like": image_id("trips/photo003.png")}]:
        body = client.get("/api/search", params={**params, "k": 6}).json()
        like = ["trips/photo003.png"] if "like" in params else None
        expected = index.search(text=params.get("q"), like=like, k=6, backend="exact")
        assert [hit["path"] for hit in body["results"]] == relative(index, expected)


def test_the_page_is_served_whole_with_nothing_from_elsewhere(served) -> None:
    client, _, _ = served
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ["/static/app.js", "/static/app.css"]:
        assert asset in page.text
        assert client.get(asset).status_code == 200
    for file in serve_module.STATIC.iterdir():  # no CDN, no web font: the page works offline
        assert "://" not in file.read_text(), file
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/api/search", "/api/status"}


# --- refusals -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "status", "reason"),
    [
        ({"q": "x", "k": 11}, 422, "k=11 is over the limit of 10 results a page; page with offset"),
        ({"q": "x", "k": 0}, 422, "query k: Input should be greater than or equal to 1"),
        ({"q": "x", "k": "ten"}, 422, "query k: Input should be a valid integer"),
        ({"q": "x", "k": 10, "offset": 5}, 422, "offset + k = 15 is over the limit of 12; refine the query"),
        ({"q": "x", "offset": -1}, 422, "query offset: Input should be greater than or equal to 0"),
        ({"q": "y" * 501}, 422, "q text of 501 characters is over the limit of 500"),
        ({"q": "x", "minus": ["m"] * 16}, 422, "17 texts is over the limit of 16"),
        ({}, 422, "give a text (q=...), an indexed image (like=<id>) or an uploaded image"),
        ({"minus": "people"}, 422, "minus alone says only what to avoid"),
        ({"q": "   "}, 422, "give a text (q=...)"),
        ({"like": "0123456789abcdef"}, 404, "no image with id '0123456789abcdef' in generation 1"),
    ],
)
def test_bad_searches_are_refused_with_the_reason(served, params: dict, status: int, reason: str) -> None:
    client, _, _ = served
    response = client.get("/api/search", params=params)
    assert response.status_code == status
    assert reason in response.json()["detail"]


def test_bad_uploads_are_refused_with_the_reason(served) -> None:
    client, _, _ = served
    big = np.random.default_rng(0).integers(0, 256, (300, 300, 3), np.uint8)
    cases = [
        ({"image": ("big.png", encoded(Image.fromarray(big), "PNG"))}, 413, "upload of 270,"),
        (
            {"image": ("bomb.png", png_claiming_size(30_000, 30_000))},
            413,
            "uploaded image 'bomb.png': too large",
        ),
        ({"image": ("notes.jpg", b"holiday notes")}, 422, "'notes.jpg': not an image"),
        ({"image": ("empty.jpg", b"")}, 422, "'empty.jpg': empty file (0 bytes)"),
        ({"picture": ("a.png", b"x")}, 422, "body image: Field required"),
    ]
    for files, status, reason in cases:
        response = client.post("/api/search", files=files)
        assert response.status_code == status, (files, response.text)
        assert reason in response.json()["detail"], response.text
    # Refused from the Content-Length header, before a byte of the body is read.
    response = client.post("/api/search", content=b"x", headers={"Content-Length": str(10**9)})
    assert response.status_code == 413 and "upload of 1,000,000,000 bytes" in response.json()["detail"]
    chunked = client.post(
        "/api/search", content=iter([b"--x\r\n"]), headers={"Content-Type": "multipart/form-data; boundary=x"}
    )
    assert chunked.status_code == 411 and "Content-Length" in chunked.json()["detail"]
    bad_heatmap = client.get(f"/api/images/{image_id('photo002.jpg')}/heatmap", params={"q": " "})
    assert bad_heatmap.status_code == 422 and "give the text" in bad_heatmap.json()["detail"]


def test_a_missing_original_is_a_404_and_the_server_keeps_serving(tmp_path: Path, tiny_bridge) -> None:
    folder = tmp_path / "photos"
    names = make_photos(folder, 4)
    build(folder, tiny_bridge, tmp_path / "index")
    client = TestClient(create_app(tmp_path / "index", bridge=tiny_bridge), base_url=LOCAL)
    gone = names[0]
    (folder / gone).unlink()
    reason = f"image '{image_id(gone)}' ('{gone}') is in the index but its file cannot be read"
    for what in ["original", "thumbnail", "heatmap?q=red"]:
        response = client.get(f"/api/images/{image_id(gone)}/{what}")
        assert response.status_code == 404 and response.json()["detail"].startswith(reason), response.text
        assert "run dinobridge index again" in response.json()["detail"]
    # More like it still works: an indexed image is searched by its stored embeddings, not its file.
    like = client.get("/api/search", params={"like": image_id(gone), "k": 1})
    assert like.status_code == 200 and like.json()["results"][0]["path"] == gone
    assert client.get("/api/search", params={"q": "red", "k": 4}).status_code == 200
    assert (
        client.get(f"/api/images/{image_id(names[1])}/original").content == (folder / names[1]).read_bytes()
    )


def test_with_a_token_every_request_must_carry_it(served, tiny_bridge) -> None:
    _, index, _ = served
    app = create_app(index.directory, bridge=tiny_bridge, token="s3cret-token")
    # Any Host is answered: the token, not the address, is what guards a server beyond loopback.
    client = TestClient(app, base_url="http://photos.example:8000")
    for url in ["/", "/api/status", "/api/search?q=red", "/static/app.js", "/openapi.json"]:
        response = client.get(url)
        assert response.status_code == 401 and "needs its token" in response.json()["detail"], url
    assert client.get("/api/status", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/status", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
    assert client.get("/api/status", params={"token": "s3cret-token"}).status_code == 200

    page = client.get("/", params={"token": "s3cret-token"})  # the link a person opens once
    assert page.status_code == 200 and "HttpOnly" in page.headers["set-cookie"]
    assert client.get("/api/search?q=red").status_code == 200  # the page's own requests: by the cookie
    assert client.get(f"/api/images/{image_id('photo002.jpg')}/thumbnail").status_code == 200


def test_without_a_token_only_loopback_names_are_answered(served) -> None:
    _, index, _ = served
    client = served[0]
    for host in ["127.0.0.1:8000", "localhost:8000", "[::1]:8000"]:
        assert client.get("/api/status", headers={"Host": host}).status_code == 200, host
    # A page elsewhere that rebinds its own name to 127.0.0.1 sends its name as the Host: refused.
    response = client.get("/api/status", headers={"Host": "attacker.example"})
    assert response.status_code == 421 and "127.0.0.1 or localhost only" in response.json()["detail"]


def test_binding_beyond_loopback_needs_a_token(
    served, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    check_exposure("127.0.0.1", None)
    check_exposure("0.0.0.0", "a-token")
    with pytest.raises(ValueError, match="serving on 0.0.0.0 makes the collection reachable"):
        check_exposure("0.0.0.0", None)
    monkeypatch.delenv("DINOBRIDGE_TOKEN", raising=False)
    _, index, _ = served
    assert dinobridge(["serve", str(index.directory), "--host", "192.168.1.5"]) == 2
    assert "give a token (--token, or the environment variable DINOBRIDGE_TOKEN)" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):
        dinobridge(["serve", str(index.directory), "--port", "70000"])
    assert "argument --port: '70000' is not a port number from 0 to 65535" in capsys.readouterr().err


# --- an index updated under the running app -------------------------------------------------------------


def test_an_index_updated_under_the_app_is_served_without_a_restart(tmp_path: Path, tiny_bridge) -> None:
    folder, out = tmp_path / "photos", tmp_path / "index"
    make_photos(folder, 4)
    build(folder, tiny_bridge, out)
    client = TestClient(create_app(out, bridge=tiny_bridge), base_url=LOCAL)
    assert client.get("/api/status").json()["images"] == 4

    seen, failures, stop = [], [], threading.Event()

    def keep_searching() -> None:  # a client searching all through the update
        while not stop.is_set():
            response = client.get("/api/search", params={"q": "a red square", "k": 10})
            if response.status_code != 200:
                failures.append(response.text)
            else:
                body = response.json()
                seen.append((body["generation"], body["searched"], len(body["results"])))

    searcher = threading.Thread(target=keep_searching)
    searcher.start()
    try:
        new = make_photos(folder, 6, first_seed=100)
        updated = build(folder, tiny_bridge, out, commit_every=2)  # three commits: 6, 8, then 10 images
    finally:
        stop.set()
        searcher.join()
    assert not failures
    committed = {1: 4, 2: 6, 3: 8, 4: 10}
    assert all(committed[generation] == searched == found for generation, searched, found in seen), seen
    assert [g for g, _, _ in seen] == sorted(g for g, _, _ in seen)  # never back to an older generation

    status = client.get("/api/status").json()
    assert (status["images"], status["generation"]) == (10, updated.store.generation)
    like = client.get("/api/search", params={"like": image_id(new[0]), "k": 1}).json()
    assert like["results"][0]["path"] == new[0]  # a new photo, found and served by its id
    assert client.get(f"/api/images/{image_id(new[0])}/original").content == (folder / new[0]).read_bytes()


def test_a_generation_that_cannot_be_opened_is_not_served(tmp_path: Path, tiny_bridge) -> None:
    folder, out = tmp_path / "photos", tmp_path / "index"
    names = make_photos(folder, 4)
    build(folder, tiny_bridge, out)
    client = TestClient(create_app(out, bridge=tiny_bridge), base_url=LOCAL)
    before = client.get("/api/search", params={"q": "red", "k": 4}).json()
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["generation"] += 1
    manifest["shards"].append({"name": "shard-000099", "rows": 3, "dropped": []})  # never written
    (out / "manifest.json").write_text(json.dumps(manifest))

    after = client.get("/api/search", params={"q": "red", "k": 4})
    assert after.status_code == 200 and after.json() == {**before, "seconds": after.json()["seconds"]}
    status = client.get("/api/status").json()
    assert status["generation"] == 1 and "shard-000099" in status["reload_error"]
    assert client.get(f"/api/images/{image_id(names[0])}/original").status_code == 200
