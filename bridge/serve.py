"""`dinobridge serve`: an image index and its bridge loaded once, searched over HTTP, with a web page.

`create_app` builds the FastAPI app: a JSON API (text, uploaded-image and "more like this" searches,
thumbnails, originals, heatmaps, status; FastAPI's OpenAPI description at /openapi.json and /docs) and the
page at `/` (bridge/static/). `serve` checks the address is safe to bind and runs the app under uvicorn.

Files are addressed by an image id (a hash of the indexed path), never by a path, so no request names a
file outside the index. The index is re-opened when `dinobridge index` commits a new generation; a query
always runs on one whole committed generation. Bad requests get a 4xx with a JSON `detail` naming the
problem and the fix.

Not here: the index and its queries (index.py), image decoding rules (images.py), heatmaps
(grounding.py), argument parsing and printing (cli.py).
"""

from __future__ import annotations

import contextlib
import hmac
import io
import logging
import mimetypes
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from pathlib import Path
from typing import TYPE_CHECKING, Annotated
from urllib.parse import quote

import numpy as np
from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders

from bridge.adapters import adapter_with_fingerprint
from bridge.images import ImageLoadError, load_image
from bridge.index import ImageIndex
from bridge.index_files import MANIFEST, image_id, read_manifest
from bridge.numpy_text import TextQueryEncoder
from bridge.search import FLAT_UP_TO, import_faiss

if TYPE_CHECKING:
    from PIL import Image

    from bridge.model import TextBridge

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
TOKEN_ENV = "DINOBRIDGE_TOKEN"
TOKEN_COOKIE = "dinobridge_token"
STATIC = Path(__file__).parent / "static"
# Torch threads per server process. Measured on a 2-core machine with another job running, 200 text
# searches took p50 508 ms with torch's default threads and 20 ms with one: threads that contend for
# busy cores wait on each other at every operation. Concurrent queries are the parallelism instead: new
# texts are embedded by the NumPy twin in packed runs beside the event loop (RememberedTexts), and the
# rest take turns on the model.
# Under 8 clients over 100,000 images (benchmarks/serve.py, 2026-12-04): 263 requests/s with one thread,
# 250 with torch's default (2026-12-03, before the runs were packed: 77 and 63).
SERVE_THREADS = 1
PAGE = 24  # results a page unless asked: four rows of six thumbnails
PACK_TEXTS = 16  # new query texts embedded in one run at most (a run of 8 costs about 4 alone)


def serving_backend(count: int) -> str:
    """The back-end a server searches `count` images with. A one-shot search is exact up to
    search.EXACT_UP_TO (100,000) images; a server answers many queries and each one's time adds to every
    queued one's, so above FLAT_UP_TO it scans FAISS's 4-bit codes and re-scores the best candidates
    exactly (search.py): over 100,000 x 384 on one core, 1.4 ms a query against 9 ms for the exact float16
    product, with the same top 24 for 30 of 30 text queries (benchmarks/RESULTS.md). Exact without faiss."""
    return "faiss" if count > FLAT_UP_TO and import_faiss() is not None else "exact"


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; over a limit is a 4xx naming the limit."""

    upload_bytes: int = 20 * 2**20  # an uploaded query image's file size
    upload_pixels: int = 40_000_000  # its width x height, read from the header before decoding
    query_chars: int = 500  # one text (a query or a minus text)
    texts: int = 16  # texts and minus texts in one query
    k: int = 100  # results in one page
    results: int = 1_000  # offset + k: how deep paging goes
    thumbnail_px: int = 320  # a thumbnail's longer side
    # The longer side of the image a heatmap is drawn on: the thumbnail's, so the page lays one over the
    # other. Refining a map by the image's colours costs ~0.6 s at 320 px on one core, growing with the area.
    heatmap_px: int = 320


@dataclass
class Snapshot:
    """One committed generation of the index, with its image ids; a query holds one from start to end."""

    index: ImageIndex
    key: tuple[int, int, int]  # the manifest file's (inode, mtime, size) when it was opened
    paths_by_id: dict[str, str]  # image id -> path relative to the indexed folder
    backend: str  # the search back-end (search.py) built for this generation: serving_backend
    _described: dict[str, tuple[str, str, str]] = field(default_factory=dict, repr=False)

    @property
    def generation(self) -> int:
        return self.index.store.generation

    def describe(self, path: str) -> tuple[str, str, str]:
        """(image id, path relative to the indexed folder, content version) of an indexed path. Remembered:
        a page of results named its images through pathlib and the store anew each time, a third of a
        remembered search's server time."""
        described = self._described.get(path)
        if described is None:
            relative = Path(path).relative_to(self.index.root).as_posix()
            record = self.index.store.record(relative)
            version = record.sha256[:12] if record else ""
            described = self._described[path] = (image_id(relative), relative, version)
        return described


@dataclass
class SearchQuery:
    """A query as the API takes it; limits are checked by the app, which knows its own."""

    q: list[str]  # texts, added together
    minus: list[str]  # texts to steer away from
    like: str | None  # the id of an indexed image: more like this
    k: int | None  # results in this page (None: the app's default)
    offset: int  # results skipped: where this page starts


async def search_query(  # async: FastAPI runs a plain def dependency in its thread pool, a hop for nothing
    q: Annotated[list[str] | None, Query(description="texts, added together (repeat q=)")] = None,
    minus: Annotated[list[str] | None, Query(description="texts to steer away from (repeatable)")] = None,
    like: Annotated[str | None, Query(description="the id of an indexed image: more like this")] = None,
    k: Annotated[int | None, Query(ge=1, description="results in this page (default: 24)")] = None,
    offset: Annotated[int, Query(ge=0, description="results to skip: where this page starts")] = 0,
) -> SearchQuery:
    return SearchQuery(q or [], minus or [], like or None, k, offset)


class RememberedTexts:
    """The bridge, with each query text's embedding remembered: every page of results, every return to a
    query, asks for the same texts again. Anything but a NumPy twin is asked of the bridge itself.

    Where the tower has a NumPy twin (numpy_text.py), new texts from concurrent requests are embedded
    together: the twin runs the texts of one call as one packed forward pass, 5.4-5.7 ms a text for 8
    against 10-11 ms alone (MiniLM, 12 tokens, one core). At most `runs` embedding runs go at a time, by
    default one on every core but one: the event loop, the searches and the pages keep a core busy. A
    request whose texts are not yet taken waits for a run to end and then takes everything waiting, its own
    texts and other requests', so a run packs whatever queued behind the one before.

    On 2 cores, under 8 clients over 100,000 images, one run against two (five interleaved pairs of runs,
    a scratch probe of benchmarks/serve.py's mix): new-text p99 108-143 ms against 161-224, requests/s
    higher in four of five, server CPU a request 4.4-5.5 against 5.5-6.9 ms. A second run halves the
    packs, which costs more a text, and competes with the event loop for the second core."""

    def __init__(
        self, bridge: TextBridge, twin: TextQueryEncoder | None, size: int = 4096, runs: int | None = None
    ):
        self.bridge, self.twin, self.size = bridge, twin, size
        self.runs = runs or max(1, (os.cpu_count() or 1) - 1)
        self._embeddings: OrderedDict[str, np.ndarray] = OrderedDict()  # text -> (E,), least recent first
        self._waiting: dict[str, None] = {}  # texts asked for that no run has taken yet, in order
        self._taken: set[str] = set()  # texts a run is embedding
        self._running = 0
        self._changed = threading.Condition()  # guards all of the above

    def __getattr__(self, name: str):
        return getattr(self.bridge, name)

    def fingerprint(self) -> str:
        return self.bridge.fingerprint()

    def encode_texts(self, texts: Sequence[str] | str) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else list(texts)
        with self._changed:
            while True:
                missing = [text for text in dict.fromkeys(texts) if text not in self._embeddings]
                if not missing:
                    break
                # A text whose run failed is neither taken nor embedded: asked for again, it is retried.
                self._waiting.update((text, None) for text in missing if text not in self._taken)
                if self._waiting and (self.twin is None or self._running < self.runs):
                    self._run()
                else:
                    self._changed.wait()
            for text in texts:
                self._embeddings.move_to_end(text)
            rows = np.stack([self._embeddings[text] for text in texts])
            while len(self._embeddings) > self.size:
                self._embeddings.popitem(last=False)
        return rows

    def _run(self) -> None:
        """Embed every waiting text (called holding the lock, which it releases while it embeds)."""
        batch = list(self._waiting)[:PACK_TEXTS]
        for text in batch:
            del self._waiting[text]
        self._taken.update(batch)
        self._running += 1
        self._changed.release()
        try:
            vectors = (self.twin or self.bridge).encode_texts(batch)
        finally:
            self._changed.acquire()
            self._running -= 1
            self._taken.difference_update(batch)
            self._changed.notify_all()
        self._embeddings.update(zip(batch, vectors, strict=True))


class RememberedSearches:
    """Searches, each one's results remembered for its generation of the index: every page of results,
    every return to a query ("back" in the browser), and "more like this" on the same image ask again.
    An uploaded image is never remembered. Results are kept as deep as they were searched; a deeper page
    searches again.

    Searches run in the requests' own threads, side by side on the cores; only their new texts are embedded
    together (RememberedTexts). Whole searches as one batch, one batch at a time, were measured and
    rejected: the products do not get cheaper together, and one batch at a time left the second core idle
    (41 requests/s against 56 under 8 clients, benchmarks/RESULTS.md).
    """

    def __init__(self, queries: RememberedTexts, model_lock: threading.Lock, size: int = 1024):
        self.queries, self.model_lock, self.size = queries, model_lock, size
        self._found: OrderedDict[tuple, list[tuple[str, float]]] = OrderedDict()  # least recent first
        self._lock = threading.Lock()

    def search(
        self,
        snapshot: Snapshot,
        texts: list[str],
        minus: list[str],
        like: list[str],
        upload: Image.Image | None,
        depth: int,
    ) -> list[tuple[str, float]]:
        """The `depth` best (path, score) of the query, best first; raises what ImageIndex.search raises.
        `like`: indexed paths."""
        if upload is None and (found := self.remembered(snapshot, texts, minus, like, depth)) is not None:
            return found
        key = None if upload is not None else (snapshot.key, tuple(texts), tuple(minus), tuple(like))
        # The torch tower and the encoder are not safe to share between threads (a heatmap uses them).
        needs_model = upload is not None or ((texts or minus) and self.queries.twin is None)
        images = [upload] if upload is not None else []
        with self.model_lock if needs_model else contextlib.nullcontext():
            found = snapshot.index.search(
                text=texts, image=images, minus=minus, like=like, k=depth, backend=snapshot.backend
            )
        if key:
            with self._lock:
                self._found[key] = found
                self._found.move_to_end(key)
                while len(self._found) > self.size:
                    self._found.popitem(last=False)
        return found

    def remembered(
        self, snapshot: Snapshot, texts: list[str], minus: list[str], like: list[str], depth: int
    ) -> list[tuple[str, float]] | None:
        """The query's `depth` best if a search of this generation found them already, else None."""
        key = (snapshot.key, tuple(texts), tuple(minus), tuple(like))
        with self._lock:
            found = self._found.get(key)
            if found is None or (len(found) < depth and len(found) < len(snapshot.index)):
                return None
            self._found.move_to_end(key)
            return found[:depth]


class LiveIndex:
    """The newest committed generation of an index directory, re-opened when its manifest changes.

    A manifest is replaced with one rename after the shards it names are complete (index_files.py), so
    the file's identity is a cheap test of whether anything changed. The thread that notices a change
    opens the new generation while the others go on with the current one; a generation that fails to open
    (a different model, a damaged shard) is logged and the server keeps the one it has.
    """

    def __init__(self, directory: Path, bridge: RememberedTexts):
        self.directory, self.bridge = directory, bridge
        self.error: str | None = None  # why the newest generation could not be opened, if it could not
        self._opening = threading.Lock()
        self._failed_key: tuple[int, int, int] | None = None
        key = self._manifest_key()
        if key is None:
            read_manifest(directory)  # raises the error that names what is missing
        self.current = self._open(key)

    def get(self) -> Snapshot:
        key, current = self._manifest_key(), self.current
        if self._unchanged(key, current) or not self._opening.acquire(blocking=False):
            return current
        try:
            self.current, self.error = self._open(key), None
        except (OSError, ValueError) as error:
            self._failed_key, self.error = key, f"{type(error).__name__}: {error}"
            log.warning("kept generation %d of index '%s': %s", current.generation, self.directory, error)
        finally:
            self._opening.release()
        return self.current

    def current_if_unchanged(self) -> Snapshot | None:
        """The current generation if the manifest has not changed since it was opened, else None: `get`
        then opens the new one, which takes seconds, so not on the event loop."""
        current = self.current
        return current if self._unchanged(self._manifest_key(), current) else None

    def _unchanged(self, key: tuple[int, int, int] | None, current: Snapshot) -> bool:
        return key is None or key in (current.key, self._failed_key)

    def _manifest_key(self) -> tuple[int, int, int] | None:
        try:
            status = os.stat(self.directory / MANIFEST)
        except OSError:
            return None
        return status.st_ino, status.st_mtime_ns, status.st_size

    def _open(self, key: tuple[int, int, int]) -> Snapshot:
        index = ImageIndex.load(self.directory, self.bridge)
        backend = serving_backend(len(index))
        index.prepare(backend)  # read and built now, not by the first query that meets this generation
        return Snapshot(index, key, {image_id(path): path for path in index.paths}, backend)


class Guard:
    """Every request's checks before the app sees it: the token (or, without one, a loopback Host), an
    upload's declared size; and every answer's `nosniff` header and, for the page opened with its token,
    the cookie its own requests carry.

    A plain ASGI middleware, not FastAPI's `@app.middleware("http")`: that one runs each response through
    a stream of its own and a task, ~10% of a remembered search's time (py-spy, benchmarks/serve.py)."""

    def __init__(self, app, token: str | None, limits: Limits):
        self.app, self.token, self.limits = app, token, limits
        cookie = SimpleCookie()  # quoted as a cookie must be, whatever characters the token has
        if token:
            cookie[TOKEN_COOKIE] = token
            cookie[TOKEN_COOKIE].update({"httponly": True, "path": "/", "samesite": "strict"})
        self.cookie = cookie.output(header="").strip()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        refusal = self.refusal(request)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        token = self.token
        page_with_token = token and request.url.path == "/" and request.query_params.get("token") == token

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.append("X-Content-Type-Options", "nosniff")
                if page_with_token:
                    # The page's own requests (thumbnails are <img> tags, which send no headers) carry it.
                    headers.append("Set-Cookie", self.cookie)
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def refusal(self, request: Request) -> JSONResponse | None:
        if self.token:
            given = _given_token(request)
            if given is None or not hmac.compare_digest(given.encode(), self.token.encode()):
                return _refuse(
                    401,
                    "this server needs its token: open the page once as /?token=<token>, or send the header "
                    "'Authorization: Bearer <token>'",
                )
        elif request.url.hostname not in LOOPBACK_HOSTS:
            return _refuse(
                421,
                f"this server answers requests addressed to 127.0.0.1 or localhost only, not "
                f"'{request.headers.get('host', '')}'; to serve other machines start it with a token",
            )
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is None:
                return _refuse(411, "send the upload with a Content-Length header (no chunked uploads)")
            if not length.isdigit() or int(length) > self.limits.upload_bytes + 64 * 1024:
                return _refuse(413, _too_many_bytes(int(length) if length.isdigit() else -1, self.limits))
        return None


def _refuse(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


def check_exposure(host: str, token: str | None) -> None:
    """Refuse to bind beyond this machine without a token: anyone who reaches the port could browse."""
    if host not in LOOPBACK_HOSTS and not token:
        raise ValueError(
            f"serving on {host} makes the collection reachable from other machines; give a token "
            f"(--token, or the environment variable {TOKEN_ENV}) that every request must carry, or serve "
            f"on {DEFAULT_HOST}"
        )


def create_app(
    index_dir: str | os.PathLike,
    model_dir: str | os.PathLike | None = None,
    token: str | None = None,
    *,
    bridge: TextBridge | None = None,
    limits: Limits | None = None,
    thumbnail_dir: str | os.PathLike | None = None,
) -> FastAPI:
    """The app serving index `index_dir`, with the bridge saved at `model_dir` (default: the one the index
    records) or an already loaded `bridge`.

    token: when given, every request must carry it (an `Authorization: Bearer` header, the `token` query
    parameter, or the cookie the page gets on its first visit with `?token=`); without one, only requests
    addressed to a loopback name are answered, so a web page elsewhere cannot reach the server through
    DNS rebinding. Thumbnails are cached in `thumbnail_dir` (default: `<index_dir>.thumbnails` beside the
    index, never inside it: the index directory belongs to its writer).
    """
    index_dir, limits = Path(index_dir), limits or Limits()
    if bridge is None:
        model_dir = model_dir or read_manifest(index_dir)["model_dir"]
        bridge = _load_bridge(index_dir, model_dir)
    bridge.encoder  # noqa: B018 (built now, not by the first image query)
    twin = TextQueryEncoder.from_pretrained(model_dir) if model_dir else None
    queries = RememberedTexts(bridge, twin)
    live = LiveIndex(index_dir, queries)
    queries.encode_texts(["a photo"])  # the tower's first call costs ~0.2 s more than the next: not a user's
    resolved = index_dir.resolve()  # "." has no name of its own
    thumbnails = Path(thumbnail_dir) if thumbnail_dir else resolved.with_name(resolved.name + ".thumbnails")
    # The torch tower's tokenizer (its settings are set on every call) and the encoder are not safe to share
    # between threads; the NumPy twin is: it only reads its weights and its tokenizer.
    model_lock = threading.Lock()
    searches = RememberedSearches(queries, model_lock)
    decoding = threading.BoundedSemaphore(os.cpu_count() or 1)  # a decoded photo can take ~190 MB
    started = time.time()

    app = FastAPI(
        title="dinobridge",
        version=_version(),
        description="Search an image index by text, by an example image, or both.",
        redoc_url=None,
    )

    app.add_middleware(Guard, token=token, limits=limits)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = [f"{' '.join(str(part) for part in e['loc'])}: {e['msg']}" for e in error.errors()]
        return _refuse(422, "; ".join(problems))

    def snapshot_image(snapshot: Snapshot, image: str) -> tuple[str, Path]:
        """(relative path, file) of an indexed image by id; 404 when the index does not hold it."""
        relative = snapshot.paths_by_id.get(image)
        if relative is None:
            raise HTTPException(
                404,
                f"no image with id '{image}' in generation {snapshot.generation} of the index; ids come from "
                "/api/search, and a file removed or renamed since is gone from the index",
            )
        return relative, snapshot.index.root / relative

    def missing(image: str, relative: str, error: ImageLoadError | OSError) -> HTTPException:
        reason = error.reason if isinstance(error, ImageLoadError) else (error.strerror or str(error))
        return HTTPException(
            404,
            f"image '{image}' ('{relative}') is in the index but its file cannot be read: {reason}; "
            "run dinobridge index again to bring the index in line with the folder",
        )

    def shrunk(image: str, relative: str, path: Path, longest: int) -> Image.Image:
        """An indexed file decoded upright, its longer side at most `longest` pixels."""
        try:
            with decoding:
                picture = load_image(path)
        except ImageLoadError as error:
            raise missing(image, relative, error) from error
        picture.thumbnail((longest, longest))
        return picture

    def check_texts(values: list[str], name: str) -> list[str]:
        texts = [value.strip() for value in values if value.strip()]
        for text in texts:
            if len(text) > limits.query_chars:
                raise HTTPException(
                    422, f"{name} text of {len(text)} characters is over the limit of {limits.query_chars}"
                )
        return texts

    def page_size(query: SearchQuery) -> int:
        return query.k or min(PAGE, limits.k)

    def checked(
        query: SearchQuery, snapshot: Snapshot, upload: bool
    ) -> tuple[list[str], list[str], list[str]]:
        """(texts, minus texts, indexed paths) of a query within the limits; a 4xx naming what is not."""
        texts, minus = check_texts(query.q, "q"), check_texts(query.minus, "minus")
        k = page_size(query)
        if len(texts) + len(minus) > limits.texts:
            raise HTTPException(422, f"{len(texts) + len(minus)} texts is over the limit of {limits.texts}")
        if k > limits.k:
            raise HTTPException(
                422, f"k={k} is over the limit of {limits.k} results a page; page with offset"
            )
        if query.offset + k > limits.results:
            raise HTTPException(
                422,
                f"offset + k = {query.offset + k} is over the limit of {limits.results}; refine the query",
            )
        # An indexed image is searched by its stored embeddings: nothing decoded, no model, no lock.
        indexed = [snapshot_image(snapshot, query.like)[0]] if query.like else []
        if not texts and not upload and not indexed:
            raise HTTPException(
                422,
                "give a text (q=...), an indexed image (like=<id>) or an uploaded image; minus alone "
                "says only what to avoid",
            )
        return texts, minus, indexed

    def results_page(
        query: SearchQuery, snapshot: Snapshot, texts: list[str], found: list, seconds: float
    ) -> JSONResponse:
        k, offset = page_size(query), query.offset
        heatmap = f"heatmap?q={quote(' '.join(texts))}&" if texts else None
        results = []
        for path, score in found[offset : offset + k]:
            image, relative, version = snapshot.describe(path)
            result = {
                "id": image,
                "path": relative,
                "score": round(score, 6),
                "thumbnail": f"/api/images/{image}/thumbnail?v={version}",
                "original": f"/api/images/{image}/original",
            }
            if heatmap:
                result["heatmap"] = f"/api/images/{image}/{heatmap}v={version}"
            results.append(result)
        return JSONResponse(
            {
                "results": results,
                "offset": offset,
                "k": k,
                "more": len(found) == offset + k and offset + k < min(len(snapshot.index), limits.results),
                "searched": len(snapshot.index),
                "space": "text" if texts or query.minus else "image",
                "generation": snapshot.generation,
                "seconds": round(seconds, 6),
            }
        )

    def run_search(query: SearchQuery, upload: Image.Image | None) -> JSONResponse:
        snapshot = live.get()
        texts, minus, indexed = checked(query, snapshot, upload is not None)
        depth = query.offset + page_size(query)
        begun = time.perf_counter()
        found = searches.search(snapshot, texts, minus, indexed, upload, depth)
        return results_page(query, snapshot, texts, found, time.perf_counter() - begun)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": _PAGE_POLICY})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/search", summary="Search by text and/or an indexed image", response_model=None)
    async def search(query: Annotated[SearchQuery, Depends(search_query)]) -> JSONResponse:
        # A search found before is answered here on the event loop: the hop to a worker thread and back
        # cost more than the answer (py-spy, benchmarks/serve.py). New work goes to a worker thread.
        snapshot = live.current_if_unchanged()
        if snapshot is None:  # a new generation to open first, which takes seconds
            return await run_in_threadpool(run_search, query, None)
        texts, minus, indexed = checked(query, snapshot, upload=False)
        depth = query.offset + page_size(query)
        begun = time.perf_counter()
        found = searches.remembered(snapshot, texts, minus, indexed, depth)
        if found is None:  # embedding and searching: in a worker thread
            found = await run_in_threadpool(searches.search, snapshot, texts, minus, indexed, None, depth)
        return results_page(query, snapshot, texts, found, time.perf_counter() - begun)

    @app.post(
        "/api/search",
        summary="Search by an uploaded image, with texts and an indexed image if given",
        response_model=None,
    )
    def search_upload(
        image: Annotated[UploadFile, File(description="the query image")],
        query: Annotated[SearchQuery, Depends(search_query)],
    ) -> JSONResponse:
        data = image.file.read(limits.upload_bytes + 1)
        if len(data) > limits.upload_bytes:
            raise HTTPException(413, _too_many_bytes(len(data), limits))
        try:
            with decoding:
                upload = load_image(data, max_pixels=limits.upload_pixels)
        except ImageLoadError as error:
            status = 413 if error.reason.startswith("too large") else 422
            name = image.filename or "the upload"
            raise HTTPException(status, f"uploaded image '{name}': {error.reason}") from error
        return run_search(query, upload)

    @app.get("/api/status", summary="What is served: images, model, index generation, search back-end")
    def status() -> dict:
        snapshot = live.get()
        return {
            "images": len(snapshot.index),
            "generation": snapshot.generation,
            "backend": snapshot.backend,
            "model": str(model_dir) if model_dir else snapshot.index.model_dir,
            "fingerprint": snapshot.index.fingerprint,
            "index": str(index_dir),
            "reload_error": live.error,
            "uptime_seconds": round(time.time() - started, 1),
            "version": _version(),
        }

    @app.get("/api/images/{image}/thumbnail", summary="A small upright JPEG of an indexed image")
    def thumbnail(image: str) -> Response:
        snapshot = live.get()
        relative, path = snapshot_image(snapshot, image)
        record = snapshot.index.store.record(relative)
        cached = thumbnails / record.sha256[:2] / f"{record.sha256}-{limits.thumbnail_px}.jpg"
        if not cached.is_file():
            data = _encoded(shrunk(image, relative, path, limits.thumbnail_px), "JPEG", quality=85)
            if not _write_cache(cached, data):
                return Response(data, media_type="image/jpeg")
        # The URL carries the content's hash (v=), so a changed file gets a new URL and this one never goes stale.
        return FileResponse(cached, media_type="image/jpeg", headers={"Cache-Control": "max-age=86400"})

    @app.get("/api/images/{image}/original", summary="The indexed file itself, by id")
    def original(image: str) -> StreamingResponse:
        snapshot = live.get()
        relative, path = snapshot_image(snapshot, image)
        try:  # opened here: a file deleted from now on still streams whole
            handle = open(path, "rb")  # noqa: SIM115 (closed by the response when it is sent)
        except OSError as error:
            raise missing(image, relative, error) from error
        size = os.fstat(handle.fileno()).st_size
        media_type = mimetypes.guess_type(relative)[0] or "application/octet-stream"
        headers = {"Content-Length": str(size), "Content-Disposition": _inline(Path(relative).name)}
        return StreamingResponse(_chunks(handle), media_type=media_type, headers=headers)

    @app.get("/api/images/{image}/heatmap", summary="Where in an indexed image a text is: a PNG overlay")
    def heatmap(image: str, q: Annotated[str, Query(description="the text to find")]) -> Response:
        texts = check_texts([q], "q")
        if not texts:
            raise HTTPException(422, "q: give the text to find in the image")
        snapshot = live.get()
        relative, path = snapshot_image(snapshot, image)
        picture = shrunk(image, relative, path, limits.heatmap_px)
        # torch and matplotlib: only heatmaps need them
        from bridge.grounding import heatmaps, overlay_heatmap, refine_with_image

        patch = bridge.encoder.patch_size
        if min(picture.size) < patch:
            raise HTTPException(
                422,
                f"image '{image}' is {picture.width}x{picture.height}: too thin for {patch}-pixel patches",
            )
        with model_lock:
            scores = heatmaps(bridge, picture, texts, refine=0)
        with decoding:  # the refinement needs no model, so it runs beside other queries
            (scores,) = refine_with_image(scores, picture)
        return Response(
            _encoded(overlay_heatmap(picture, scores), "PNG"),
            media_type="image/png",
            headers={"Cache-Control": "max-age=86400"},
        )

    return app


def serve(
    index_dir: str | os.PathLike,
    model_dir: str | os.PathLike | None = None,
    host: str = DEFAULT_HOST,
    port: int = 8000,
    token: str | None = None,
    threads: int | None = SERVE_THREADS,
    log_level: str = "info",
) -> None:
    """Serve `index_dir` until interrupted. Any address but loopback needs a token (default: the
    environment variable DINOBRIDGE_TOKEN). One process: the model and the index are loaded once.
    threads: torch's threads (None: torch's default, one per core)."""
    import torch
    import uvicorn

    token = token or os.environ.get(TOKEN_ENV) or None
    check_exposure(host, token)
    if threads is not None:
        torch.set_num_threads(threads)
        try:  # NumPy's BLAS (the text tower's twin) has a pool of its own, one thread a core by default
            from threadpoolctl import threadpool_limits

            threadpool_limits(threads, user_api="blas")
        except ImportError:
            pass
        faiss = import_faiss()
        if faiss is not None:  # and FAISS its OpenMP pool: idle threads spinning on a busy core cost it
            faiss.omp_set_num_threads(threads)
    app = create_app(index_dir, model_dir, token)
    uvicorn.run(app, host=host, port=port, log_level=log_level, workers=1)


# The page runs only its own script and styles, and shows only this server's images (and the query image
# the user picked, as a blob: URL).
_PAGE_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


def _load_bridge(index_dir: Path, model_dir: str | os.PathLike | None) -> TextBridge:
    from bridge.model import TextBridge

    if model_dir is None:
        raise ValueError(
            f"index '{index_dir}' does not record its model; pass the bridge directory (--model)"
        )
    # Through the LoRA adapter that built the index, if one did (its fingerprint says which, adapters.py);
    # an adapter sits on the projector, so the text tower's NumPy twin still embeds the texts.
    adapter = adapter_with_fingerprint(model_dir, read_manifest(index_dir)["fingerprint"])
    return TextBridge.from_pretrained(model_dir, adapter)


def _given_token(request) -> str | None:
    authorization = request.headers.get("authorization", "")
    if authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE)


def _too_many_bytes(size: int, limits: Limits) -> str:
    given = f"{size:,} bytes" if size >= 0 else "an unreadable Content-Length"
    return f"upload of {given} is over the limit of {limits.upload_bytes:,} bytes; send a smaller image"


def _write_cache(path: Path, data: bytes) -> bool:
    """Write a cache file atomically; False (logged) where the cache folder cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        temporary.write_bytes(data)
        os.replace(temporary, path)
        return True
    except OSError as error:
        log.warning("thumbnail not cached in '%s': %s", path.parent, error)
        return False


def _encoded(picture: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, fmt, **options)
    return buffer.getvalue()


def _chunks(handle, size: int = 256 * 1024):
    with handle:
        while chunk := handle.read(size):
            yield chunk


def _inline(name: str) -> str:
    return f"inline; filename*=UTF-8''{quote(name)}"


def _version() -> str:
    from bridge import __version__

    return __version__
