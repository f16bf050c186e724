"""Start-up cost: what `import bridge` takes, and a one-shot `dinobridge search` from a cold interpreter.

    python benchmarks/search_startup.py                      # 2,000 images, 3 timed runs of each
    python benchmarks/search_startup.py --n 100 --runs 1     # a quick check that it works (figures mean little)
    python benchmarks/search_startup.py --baseline HEAD~3    # against another commit
    python benchmarks/search_startup.py --baseline none      # this checkout only

Renders N synthetic scenes to PNG, saves the offline default bridge (a random 6-layer DINOv2 at 112 px and
MiniLM) and indexes the folder with `dinobridge index`. Then, each command in a fresh interpreter as a user
runs it: `python -X importtime -c "import bridge"` and `... "import bridge.index"` (the import time of the
bridge modules, as -X importtime counts it, and the wall time of the whole command), and
`dinobridge search INDEX "a red circle"` (wall time; run as `python -m bridge.cli`, the code the `dinobridge`
script runs, so that PYTHONPATH picks the checkout), each the median of --runs after one untimed run that
brings the files into the page cache.

The baseline is the same at another commit (default e1f3a64, the commit before the library's front door
and its lazily built encoder): its `bridge/` is extracted with `git archive` into a scratch folder and run
with PYTHONPATH pointing there, with its own saved bridge and index. Ratios are baseline / this: above 1,
this checkout is faster. Targets: `import bridge` under 1 s, the one-shot search under 4 s on 2,000 images.
Every figure here is start-up cost, which a busy machine stretches: time it on a quiet one.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bridge.synthetic import SyntheticWorld  # noqa: E402

BASELINE = "e1f3a64"
QUERY = "a red circle"
SAVE_BRIDGE = (
    "import sys; from bridge.config import BridgeConfig; from bridge.model import TextBridge; "
    "TextBridge.from_config(BridgeConfig()).save_pretrained(sys.argv[1])"
)


def run(command: list[str], source: Path) -> tuple[float, str]:
    """Run `command` with `source` first on the import path; (wall seconds, stderr). Fails loudly."""
    env = {**os.environ, "PYTHONPATH": str(source)}
    started = time.perf_counter()
    # Run from `source` too: `python -m` and `-c` put the working directory first on the path, so from
    # anywhere else a `bridge/` folder there (this checkout's) would be imported instead of `source`'s.
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=source)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return seconds, result.stderr


def bridge_import_seconds(importtime: str) -> float:
    """The import time, in seconds, of the top-level `bridge*` entries of a -X importtime report."""
    total = 0
    for line in importtime.splitlines():
        if line.startswith("import time:") and "|" in line:
            _, cumulative, name = line.split("|")
            if name.startswith(" bridge"):  # one space: top level; nested names are indented further
                total += int(cumulative)
    return total / 1e6


def measure(source: Path, work: Path, folder: Path, runs: int) -> dict[str, list[float]]:
    """Make a bridge and an index with the code at `source`, then time the start-up figures."""
    python = sys.executable
    cli = [python, "-m", "bridge.cli"]
    run([python, "-c", SAVE_BRIDGE, str(work / "bridge")], source)
    seconds, _ = run(
        [*cli, "index", str(folder), "--model", str(work / "bridge"), "--out", str(work / "index")], source
    )
    print(f"  {source}: bridge saved, {folder} indexed in {seconds:.0f} s", flush=True)
    figures: dict[str, list[float]] = {}
    commands = {
        "import bridge": [python, "-X", "importtime", "-c", "import bridge"],
        "import bridge.index": [python, "-X", "importtime", "-c", "import bridge.index"],
        "search": [*cli, "search", str(work / "index"), QUERY, "-k", "5"],
    }
    for name, command in commands.items():
        run(command, source)  # untimed: the page cache, not the disk, is what a second run meets
        for _ in range(runs):
            seconds, stderr = run(command, source)
            figures.setdefault(f"{name} wall s", []).append(seconds)
            if name.startswith("import"):
                figures.setdefault(f"{name} importtime s", []).append(bridge_import_seconds(stderr))
    return figures


def extract(revision: str, into: Path) -> Path:
    """The `bridge/` package as it is at `revision`, written under `into` (the repository is only read)."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", revision, "bridge"],
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="images in the index (default: 2000)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each command (default: 3)")
    parser.add_argument(
        "--baseline", default=BASELINE, help=f"commit to compare with, or 'none' (default: {BASELINE})"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        folder = scratch / "photos"
        started = time.perf_counter()
        for index, scene in enumerate(SyntheticWorld(seed=0).scenes(0, args.n)):
            part = folder / f"{index // 500:02d}"
            part.mkdir(parents=True, exist_ok=True)
            scene.render().save(part / f"scene{index:05d}.png")
        print(f"{args.n:,} synthetic scenes (112 px PNG) rendered in {time.perf_counter() - started:.0f} s")
        sources = {"this": REPO}
        if args.baseline != "none":
            sources[args.baseline] = extract(args.baseline, scratch / "baseline")
        results = {}
        for label, source in sources.items():
            work = scratch / f"work-{label.replace('/', '_')}"
            work.mkdir()
            results[label] = {
                k: statistics.median(v) for k, v in measure(source, work, folder, args.runs).items()
            }

        labels = list(results)
        print(f"\nmedian of {args.runs} run(s), seconds; ratio = {labels[-1]} / this\n")
        print(
            f"{'':<34}"
            + "".join(f"{label:>12}" for label in labels)
            + ("     ratio" if len(labels) > 1 else "")
        )
        for key in results["this"]:
            row = f"{key:<34}" + "".join(f"{results[label][key]:>12.3f}" for label in labels)
            if len(labels) > 1:
                row += f"{results[labels[-1]][key] / results['this'][key]:>9.2f}x"
            print(row)
        this = results["this"]
        print(
            f"\ntargets: import bridge {this['import bridge importtime s']:.3f} s (< 1 s), one-shot search "
            f"on {args.n:,} images {this['search wall s']:.2f} s (< 4 s on a quiet machine, at 2,000 images)"
        )


if __name__ == "__main__":
    main()
