"""The `dinobridge` command: one entry point, one sub-command per job.

Commands that train import `training` lazily, inside their handler: the library itself never depends
on the training package, and `dinobridge search` starts without loading it. This is the one place in
the project that prints; everything else logs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path

from bridge import __version__
from bridge.config import AdapterSettings, ConfigError, RunConfig, load_config

IMAGE_SUFFIXES = (
    ".png",
    ".jpg",
    ".jpeg",
    ".webp",
    ".bmp",
    ".tif",
    ".tiff",
    ".gif",
)  # what --out maps are saved as
GROUNDING_BRIDGE = "demo-out/grounding/bridge"  # where `dinobridge demo grounding` saves its bridge
DEFAULT_ADAPTER_NAME = "default"  # bridge.adapters.DEFAULT_ADAPTER, without importing torch to parse


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        return args.handler(args) or 0
    except (ConfigError, ValueError, OSError) as error:
        # A user's mistake or the machine's state (a bad file, a full disk, no permission): one line that
        # names it. The traceback only with -v; anything else is a bug and keeps its traceback.
        if args.verbose:
            traceback.print_exc()
        print(f"dinobridge {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dinobridge {args.command}: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinobridge", description="Language on top of a frozen DINOv2.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--version", action="version", version=f"dinobridge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train and compare two bridges on the offline default")
    demo.add_argument(
        "task",
        nargs="?",
        default="retrieval",
        choices=("retrieval", "grounding"),
        help="retrieval (default): text<->image recall; grounding: segmentation mIoU and the pointing game",
    )
    demo.add_argument(
        "--out", type=output_directory, help="output directory (default: demo-out, or demo-out/grounding)"
    )
    demo.add_argument(
        "--scenes", type=positive_int, default=12_000, help="synthetic training scenes (default: 12000)"
    )
    demo.add_argument(
        "--eval-scenes",
        type=positive_int,
        default=200,
        help="grounding: held-out scenes segmented (default: 200)",
    )
    demo.set_defaults(handler=_demo)

    train = commands.add_parser("train", help="train a text bridge on image-caption pairs")
    train.add_argument("--config", help="YAML config (default: the offline default)")
    train.add_argument(
        "--data",
        required=True,
        help="pairs.jsonl, pairs.csv, COCO captions .json, synthetic:N, or webdataset shards: "
        "'shards/{00000..00127}.tar', a .txt list of shards, or a folder of .tar",
    )
    train.add_argument("--image-root", help="folder image paths are relative to (default: the data file's)")
    train.add_argument(
        "--out", type=output_directory, required=True, help="directory for the bridge, checkpoints and logs"
    )
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    train.add_argument("--steps", type=positive_int, help="override train.steps")
    train.add_argument("--base", help="a saved bridge to start from (with --lora: to adapt)")
    train.add_argument(
        "--lora", action="store_true", help="train only a LoRA adapter on --base (settings: train.lora)"
    )
    train.add_argument(
        "--adapter", help=f"the adapter's name (default: {DEFAULT_ADAPTER_NAME}); --out keeps the base's too"
    )
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser("eval", help="evaluate a saved bridge")
    tasks = evaluate.add_subparsers(dest="task", required=True)
    retrieval = tasks.add_parser("retrieval", help="text<->image recall@1/5/10 on image-caption pairs")
    retrieval.add_argument("--model", required=True, help="a saved bridge directory")
    retrieval.add_argument("--data", required=True, help="pairs.jsonl, pairs.csv, COCO .json or synthetic:N")
    retrieval.add_argument("--image-root")
    retrieval.add_argument("--json", action="store_true", help="print the metrics as JSON")
    _add_adapter_option(retrieval)
    retrieval.set_defaults(handler=_eval_retrieval)
    zeroshot = tasks.add_parser("zeroshot", help="zero-shot classification on an ImageFolder layout")
    zeroshot.add_argument("--model", required=True, help="a saved bridge directory")
    zeroshot.add_argument("--data", required=True, help="root/<class name>/<image>")
    zeroshot.add_argument("--json", action="store_true", help="print the metrics as JSON")
    _add_adapter_option(zeroshot)
    zeroshot.set_defaults(handler=_eval_zeroshot)

    segmentation = tasks.add_parser("segmentation", help="mIoU and pointing game on images with label masks")
    segmentation.add_argument("--model", required=True, help="a saved bridge directory")
    segmentation.add_argument(
        "--data", required=True, help="root/images/, root/masks/*.png, root/classes.txt"
    )
    _add_grounding_options(segmentation)
    segmentation.add_argument("--json", action="store_true", help="print the metrics as JSON")
    _add_adapter_option(segmentation)
    segmentation.set_defaults(handler=_eval_segmentation)

    ground = commands.add_parser("ground", help="where in an image a text is: a heatmap per text")
    ground.add_argument("image", help="an image file")
    ground.add_argument("texts", nargs="+", help="one or more texts, each mapped on its own")
    ground.add_argument(
        "--model", default=GROUNDING_BRIDGE, help=f"a saved bridge (default: {GROUNDING_BRIDGE})"
    )
    ground.add_argument(
        "--out", type=output_image, help="write the heatmaps over the image to this PNG, one panel per text"
    )
    ground.add_argument(
        "--scale", type=positive_int, help="short side in pixels to map at (default: one window)"
    )
    _add_map_options(ground)
    _add_adapter_option(ground)
    ground.set_defaults(handler=_ground)

    segment = commands.add_parser("segment", help="label every pixel with one of the named classes")
    segment.add_argument("image", help="an image file")
    segment.add_argument("--classes", required=True, help='comma-separated class names, e.g. "cat,dog,sofa"')
    segment.add_argument(
        "--out", type=output_image, required=True, help="the segmentation over the image, with a legend (PNG)"
    )
    segment.add_argument(
        "--model", default=GROUNDING_BRIDGE, help=f"a saved bridge (default: {GROUNDING_BRIDGE})"
    )
    _add_grounding_options(segment)
    _add_adapter_option(segment)
    segment.set_defaults(handler=_segment)

    index = commands.add_parser("index", help="index a folder of images (again: only new or changed files)")
    index.add_argument("folder", help="folder walked recursively for images")
    index.add_argument("--model", required=True, help="a saved bridge directory")
    index.add_argument("--out", type=output_directory, required=True, help="the index directory")
    _add_adapter_option(index)
    index.add_argument(
        "--workers",
        type=non_negative_int,
        help="decoding processes (default on a CPU: none up to 2 cores, else half of them, the rest "
        "encode; on a GPU: one per core, less one; 0: decode in this process)",
    )
    index.add_argument(
        "--threads",
        type=positive_int,
        help="torch threads of the encoder (default: the cores the decoding processes leave, at least 1)",
    )
    index.add_argument(
        "--device",
        type=device_name,
        help="cpu, cuda, cuda:1, mps (default: a CUDA GPU, then MPS, then the CPU)",
    )
    index.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="encoder precision (default: bf16 on a GPU, fp32 on a CPU)",
    )
    index.add_argument(
        "--batch-size", type=positive_int, help="images a forward pass (default: 256 on a GPU, 32 on a CPU)"
    )
    index.add_argument(
        "--compile", action="store_true", help="torch.compile the encoder (large folders, GPU)"
    )
    index.add_argument(
        "--include-hidden",
        action="store_true",
        help="also walk hidden and system files and folders (.*, @eaDir, node_modules, Thumbs.db, ...)",
    )
    index.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="skip files and folders matching GLOB: a name ('*.tmp', 'drafts'), or with a '/' a path "
        "relative to the folder ('2019/raw*') (repeatable)",
    )
    index.set_defaults(handler=_index)

    search = commands.add_parser("search", help="search an index by text, by example image, or both")
    search.add_argument("index", help="an index directory made by `dinobridge index`")
    search.add_argument("texts", nargs="*", help="text queries, added together")
    search.add_argument("--minus", action="append", default=[], help="text to steer away from (repeatable)")
    search.add_argument("--image", action="append", default=[], help="query image (repeatable)")
    search.add_argument("-k", type=positive_int, default=10, help="results to show (default: 10)")
    search.add_argument("--model", help="bridge directory (default: the one the index was built with)")
    search.add_argument("--json", action="store_true", help="print a JSON list of {path, score}")
    search.add_argument(
        "--adapter", help="the bridge's LoRA adapter to query through (default: the one that built the index)"
    )
    search.set_defaults(handler=_search)

    serve = commands.add_parser(
        "serve", help="serve an index to a browser and a JSON API (loopback by default)"
    )
    serve.add_argument("index", help="an index directory made by `dinobridge index`")
    serve.add_argument("--model", help="bridge directory (default: the one the index was built with)")
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine)"
    )
    serve.add_argument("--port", type=port_number, default=8000, help="port (default: 8000)")
    serve.add_argument(
        "--token",
        nargs="?",
        const="",
        help="every request must carry this token (needed beyond 127.0.0.1); without a value one is made up "
        "and printed; better kept out of the command line in DINOBRIDGE_TOKEN",
    )
    serve.set_defaults(handler=_serve)

    export = commands.add_parser(
        "export", help="write an index's embeddings to a Parquet file (LanceDB, ...)"
    )
    export.add_argument("index", help="an index directory made by `dinobridge index`")
    export.add_argument("out", help="the Parquet file to write (replaced if it exists)")
    export.add_argument(
        "--space",
        choices=["text", "image", "both"],
        default="text",
        help="text: the bridge's text space (search by text); image: DINOv2's CLS (image to image); "
        "both: the two, as columns embedding and image_embedding (default: text)",
    )
    export.set_defaults(handler=_export)

    merge = commands.add_parser("merge", help="fold a bridge's LoRA adapter into a plain bridge")
    merge.add_argument("model", help="a saved bridge directory holding adapters")
    merge.add_argument("--adapter", required=True, help="the adapter to fold in")
    merge.add_argument("--out", type=output_directory, required=True, help="directory for the plain bridge")
    merge.set_defaults(handler=_merge)
    _add_llm_route_commands(commands)
    _add_push_command(commands)
    return parser


def _add_adapter_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", help="a LoRA adapter saved with the bridge (default: the base bridge)")


def _add_grounding_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threshold",
        type=cosine,
        help="cosine below which a pixel is background (default: bridge.grounding.DEFAULT_THRESHOLD)",
    )
    _add_map_options(parser)


def _add_map_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shifts", type=positive_int, default=2, help="sub-patch shifts per axis (default: 2; 1: off)"
    )
    parser.add_argument(
        "--refine", type=non_negative_int, default=10, help="colour refinement steps (default: 10; 0: off)"
    )


# Argument types: a bad value is refused by argparse, naming the option, before any model loads.


def _whole_number(least: int, wanted: str, most: float = float("inf")):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if not least <= value <= most:
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}")
        return value

    return parse


positive_int = _whole_number(1, "a whole number of at least 1")
non_negative_int = _whole_number(0, "a whole number of at least 0")
port_number = _whole_number(0, "a port number from 0 to 65535", most=65535)


def cosine(text: str) -> float:
    """A cosine similarity: a number in [-1, 1] (NaN fails the comparison, so it is refused too)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not -1 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a cosine; give a number from -1 to 1")
    return value


def device_name(text: str) -> str:
    """cpu, cuda, cuda:N or mps, checked here so that parsing never imports torch."""
    kind, _, number = text.partition(":")
    if not (text in ("cpu", "cuda", "mps") or (kind == "cuda" and number.isdigit())):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a device; give cpu, cuda, cuda:N (N: the GPU's number) or mps"
        )
    return text


def output_directory(text: str) -> str:
    """An output directory, new or existing, but not a file: a run must never write over one."""
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"'{text}' is an existing file; give a directory, new or existing")
    return text


def output_image(text: str) -> str:
    """An output image: not an existing directory, and in a folder that exists."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"'{text}' is a directory; give an image file name, e.g. out.png")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(
            f"folder '{path.parent}' of '{text}' does not exist; create it first"
        )
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise argparse.ArgumentTypeError(
            f"'{text}' does not end in an image file type PIL writes; give e.g. {path.stem or 'out'}.png"
        )
    return text


def _threshold(args) -> float:
    from bridge.grounding import DEFAULT_THRESHOLD  # here, not at parse time: it imports torch

    return DEFAULT_THRESHOLD if args.threshold is None else args.threshold


def _grounding_bridge(directory: str, adapter: str | None = None):
    from bridge.hub import is_hub_name
    from bridge.model import TextBridge

    if not Path(directory).is_dir() and not is_hub_name(directory):
        raise FileNotFoundError(
            f"no bridge at '{directory}'; train one with `dinobridge demo grounding` or pass --model DIR "
            "(or a Hub repo id)"
        )
    return TextBridge.from_pretrained(directory, adapter)


def _ground(args) -> int:
    from PIL import Image

    from bridge.grounding import heatmaps, overlay_heatmap
    from bridge.images import load_image

    image = load_image(args.image)
    maps = heatmaps(
        _grounding_bridge(args.model, args.adapter), image, args.texts, args.scale, args.shifts, args.refine
    )
    for text, heatmap in zip(args.texts, maps, strict=True):
        row, column = divmod(int(heatmap.argmax()), heatmap.shape[1])
        print(
            f"{text!r}: peak cosine {heatmap.max():.3f} at x={column}, y={row} (image {image.width}x{image.height})"
        )
    if args.out:
        panels = [overlay_heatmap(image, heatmap) for heatmap in maps]
        canvas = Image.new("RGB", (image.width * len(panels), image.height))
        for index, panel in enumerate(panels):
            canvas.paste(panel, (index * image.width, 0))
        canvas.save(args.out)
        print(f"wrote {args.out}: the heatmaps of {len(panels)} text(s), left to right in the order given")
    return 0


def _segment(args) -> int:
    from bridge.grounding import draw_segmentation, parse_class_list, segment
    from bridge.images import load_image

    class_names = parse_class_list(args.classes)  # before loading a model: a bad list fails at once
    image = load_image(args.image)
    bridge = _grounding_bridge(args.model, args.adapter)
    result = segment(bridge, image, class_names, _threshold(args), shifts=args.shifts, refine=args.refine)
    draw_segmentation(image, result).save(args.out)
    for label, name in enumerate(["background", *class_names]):
        print(f"{name}: {(result.labels == label).mean():.1%} of the pixels")
    print(f"wrote {args.out}")
    return 0


def _eval_segmentation(args) -> int:
    from bridge.images import load_image
    from bridge.model import TextBridge
    from training.data import load_mask, load_segmentation_folder
    from training.evaluate import evaluate_segmentation

    samples, class_names = load_segmentation_folder(args.data)
    bridge = TextBridge.from_pretrained(args.model, args.adapter)
    loaded = ((load_image(image), load_mask(mask)) for image, mask in samples)
    metrics = evaluate_segmentation(
        bridge, loaded, class_names, _threshold(args), shifts=args.shifts, refine=args.refine
    )
    metrics["classes"] = len(class_names)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(f"{metrics['images']} images, {len(class_names) - 1} classes and '{class_names[0]}'")
        print(f"mIoU {metrics['mIoU']:.3f} with background, {metrics['mIoU_no_background']:.3f} without")
        print(f"pointing game {metrics['pointing']:.3f} over {metrics['objects']} objects")
    return 0


def _index(args) -> int:
    import torch

    from bridge.decoding import split_cores, usable_cores
    from bridge.index import ImageIndex
    from bridge.model import TextBridge
    from bridge.runtime import encode_settings, processes

    cores = usable_cores()
    # A huge value exhausts the machine's processes or threads (torch then fails deep inside the encoder):
    # refused before the bridge loads. Threads past the cores only wait; a decoding worker may wait on a
    # slow disk, so a few per core are allowed.
    for option, value, most in (("--workers", args.workers, 4 * cores), ("--threads", args.threads, cores)):
        if value is not None and value > most:
            raise ValueError(
                f"{option} {value} is too many for this machine's {cores} cores; give at most {most}"
            )
    state = processes()
    # Under `accelerate launch`, this process's GPU; alone, the first of CUDA, MPS, CPU (runtime.py).
    device = args.device or (str(state.device) if state.num_processes > 1 else None)
    settings = encode_settings(device, args.precision, args.compile, args.batch_size)
    bridge = TextBridge.from_pretrained(args.model, args.adapter).to(settings.device)
    bridge.encoder.run_with(settings)
    on_cpu = settings.device.type == "cpu"  # on a GPU (CUDA, MPS) the encoder needs one thread to feed it
    workers, threads = split_cores(cores, not on_cpu, args.workers, args.threads)
    torch.set_num_threads(threads)  # workers + threads <= cores: neither waits for the other's core
    options = {"batch_size": settings.batch_size, "gpu_decode": settings.gpu_decode}
    options |= {"include_hidden": args.include_hidden, "exclude": args.exclude}
    index = ImageIndex.build(args.folder, bridge, args.out, workers=workers, model_dir=args.model, **options)
    if state.is_main_process:  # under `accelerate launch` the main process reports the whole run
        print(index.summary)
    return 0


def _search(args) -> int:
    from bridge.adapters import adapter_with_fingerprint
    from bridge.hub import is_hub_name
    from bridge.index import ImageIndex
    from bridge.index_files import read_manifest
    from bridge.numpy_text import TextQueryEncoder

    if not (args.texts or args.image):
        raise ValueError("give a text query, an --image, or both")
    if args.model is not None:  # a wrong --model (a VisionLLM, say) is named before the index is read
        from bridge.hub import local_directory
        from bridge.model_files import TEXT_BRIDGE, read_saved_config

        read_saved_config(local_directory(args.model), TEXT_BRIDGE)
    manifest = read_manifest(Path(args.index))
    model_dir = args.model or manifest["model_dir"]
    # The adapter that built the index is the one whose saved fingerprint it records (adapters.py).
    adapter = args.adapter or adapter_with_fingerprint(model_dir, manifest["fingerprint"])
    if model_dir is None:
        raise ValueError(
            f"index '{args.index}' does not record its model; pass the bridge directory (--model)"
        )
    if args.model is None and not Path(model_dir).is_dir() and not is_hub_name(model_dir):
        raise FileNotFoundError(
            f"index '{args.index}' was built with the bridge at '{model_dir}', which is not there any more; "
            "pass where it is now with --model"
        )
    # A text-only query needs the bridge's text tower alone; run in NumPy when it can be, the search
    # never imports torch, which is most of a one-shot search's time (numpy_text.py).
    bridge = TextQueryEncoder.from_pretrained(model_dir) if not (args.image or adapter) else None
    if bridge is None:
        from bridge.model import TextBridge

        bridge = TextBridge.from_pretrained(model_dir, adapter)
    index = ImageIndex.load(args.index, bridge)
    results = index.search(text=args.texts, image=args.image, minus=args.minus, k=args.k)
    if args.json:
        print(json.dumps([{"path": path, "score": round(score, 6)} for path, score in results], indent=1))
    elif results:
        print("\n".join(f"{score:.4f}  {path}" for path, score in results))
    else:
        print(f"index '{args.index}' is empty")
    return 0


def _export(args) -> int:
    from bridge.export import export_parquet

    rows = export_parquet(args.index, args.out, args.space)
    print(f"wrote {rows} images' {args.space} embeddings to {args.out}")
    return 0


def _serve(args) -> int:
    import os
    import secrets

    from bridge.serve import TOKEN_ENV, check_exposure, serve

    made_up = args.token == ""  # --token without a value
    token = secrets.token_urlsafe(18) if made_up else args.token or os.environ.get(TOKEN_ENV) or None
    check_exposure(args.host, token)  # before loading anything: a refusal should not take seconds
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"dinobridge serve: open http://{host}:{args.port}/{f'?token={token}' if made_up else ''}", flush=True
    )
    if token and not made_up:
        print("every request must carry the token: open the page once as /?token=<token>", flush=True)
    serve(args.index, args.model, args.host, args.port, token)
    return 0


def _demo(args) -> int:
    if args.task == "grounding":
        return _demo_grounding(args)
    from training.demo import run_demo

    args.out = args.out or "demo-out"
    result = run_demo(args.out, train_scenes=args.scenes)
    print(f"\ndinobridge demo: offline default, {args.scenes} synthetic training scenes")
    print(f"held-out gallery: {result.held_out} scenes, each with its own captions as queries\n")
    print(f"{'projector':<24}{'text->image R@1/5/10':<24}image->text R@1/5/10")
    for name, run in result.results.items():
        print(
            f"{name:<24}{_recalls(run.metrics, 'text_to_image'):<24}{_recalls(run.metrics, 'image_to_text')}"
        )
    print(f"\ntop-5 images for a few captions: {result.picture}")
    print(f"trained bridge: {result.bridge_dir}  ({result.seconds:.0f} s in all)")
    return 0


def _demo_grounding(args) -> int:
    from training.demo import run_grounding_demo

    out = args.out or str(Path(GROUNDING_BRIDGE).parent)
    result = run_grounding_demo(out, train_scenes=args.scenes, eval_scenes=args.eval_scenes)
    print(
        f"\ndinobridge demo grounding: offline default, {args.scenes} synthetic training scenes, captions only"
    )
    print(
        f"segmentation of {result.scenes} held-out scenes, {len(result.class_names)} classes and background\n"
    )
    print(f"{'projector':<30}{'mIoU':>7}{'mIoU no bg':>12}{'pointing':>10}{'threshold':>11}{'t->i R@1':>10}")
    for name, metrics in result.segmentation.items():
        recall = result.retrieval[name].metrics["text_to_image_R@1"]
        print(
            f"{name:<30}{metrics['mIoU']:>7.3f}{metrics['mIoU_no_background']:>12.3f}"
            f"{metrics['pointing']:>10.3f}{metrics['threshold']:>11.2f}{recall:>10.3f}"
        )
    print("\n(the baseline's threshold is its best on these very scenes: an upper bound for it)")
    print(f"three heatmaps of one held-out scene: {result.picture}")
    print(f"trained bridge: {result.bridge_dir}  ({result.seconds:.0f} s in all)")
    return 0


def _train(args) -> int:
    from training.align import train_text_bridge

    # The feature cache's size is shown before it is filled, -v or not: a user sees what a run will write.
    logging.getLogger("training.cache").setLevel(logging.INFO)
    config = load_config(args.config) if args.config else RunConfig()
    _set_steps(config.train, args.steps)
    if args.lora and config.train.lora is None:
        config.train.lora = AdapterSettings()
    if not args.lora and config.train.lora is not None:
        raise ConfigError(f"'{args.config}' has a train.lora section: add --lora --base BRIDGE_DIR to use it")
    _, result = train_text_bridge(
        config, args.data, args.out, args.resume, args.image_root, base=args.base, adapter=args.adapter
    )
    if not _reports_the_run():
        return 0
    _print_run_length(result.skipped, config.train.epochs, result.steps)
    if result.metrics:
        print(f"held-out text->image R@1/5/10 {_recalls(result.metrics, 'text_to_image')}")
        print(f"held-out image->text R@1/5/10 {_recalls(result.metrics, 'image_to_text')}")
        if "best_step" in result.metrics:
            name = result.metrics["best_metric"]
            print(
                f"kept step {result.metrics['best_step']} of {result.steps}, the best held-out {name}; "
                f"the last step scored {result.metrics[f'last_{name}']:.3f}"
            )
    else:
        print("no held-out pairs (train.held_out: 0): nothing measured")
    adapter = f", with adapter '{args.adapter or DEFAULT_ADAPTER_NAME}'" if args.lora else ""
    print(f"saved the bridge to {args.out}{adapter}")
    return 0


def _merge(args) -> int:
    from bridge.model import TextBridge

    if (Path(args.out) / "config.json").exists():
        raise ValueError(f"--out '{args.out}' already holds a model; give a new or empty directory")
    TextBridge.from_pretrained(args.model, args.adapter).merged().save_pretrained(args.out)
    print(f"wrote {args.out}: the bridge with adapter '{args.adapter}' folded in (loads without peft)")
    return 0


def _eval_retrieval(args) -> int:
    from bridge.model import TextBridge
    from training.align import CaptionedFeatures, evaluate_alignment
    from training.cache import FeatureCache, TextCache, user_cache_dir
    from training.data import load_pairs

    bridge = TextBridge.from_pretrained(args.model, args.adapter)
    pairs = load_pairs(args.data, args.image_root)
    cache_dir = user_cache_dir()  # never the model's directory: eval only reads a saved model
    features = FeatureCache(cache_dir, bridge.encoder).features(pairs)
    if len(features) == 0:
        raise ValueError(f"no image of '{args.data}' could be read; see the warnings above")
    metrics = evaluate_alignment(
        bridge, CaptionedFeatures.build(features, TextCache(cache_dir, bridge.tower))
    )
    metrics = {"images": len(features), "skipped": len(features.failures), **metrics}
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(f"{len(features)} images ({len(features.failures)} unreadable, skipped)")
        print(f"text->image R@1/5/10 {_recalls(metrics, 'text_to_image')}")
        print(f"image->text R@1/5/10 {_recalls(metrics, 'image_to_text')}")
    return 0


def _eval_zeroshot(args) -> int:
    from bridge.model import TextBridge
    from bridge.zeroshot import zero_shot_classify
    from training.cache import FeatureCache, user_cache_dir
    from training.data import Pair, load_image_folder
    from training.evaluate import zeroshot_accuracy

    bridge = TextBridge.from_pretrained(args.model, args.adapter)
    paths, labels, class_names = load_image_folder(args.data)
    # The feature cache decodes, skips unreadable files with their reason, and encodes, as for retrieval.
    pairs = [Pair(path, [class_names[label]], path) for path, label in zip(paths, labels, strict=True)]
    features = FeatureCache(user_cache_dir(), bridge.encoder).features(pairs)
    if len(features) == 0:
        raise ValueError(f"no image under '{args.data}' could be read; see the warnings above")
    label_of = dict(zip(paths, labels, strict=True))
    kept = [label_of[pair.image] for pair in features.pairs]
    probabilities = zero_shot_classify(bridge, features[list(range(len(features)))], class_names)
    metrics = zeroshot_accuracy(probabilities, kept)
    metrics = {"images": len(kept), "classes": len(class_names), "skipped": len(features.failures), **metrics}
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        for origin, reason in features.failures:
            print(f"skipped {origin}: {reason}")
        print(
            f"{len(kept)} images, {len(class_names)} classes: top-1 {metrics['top1']:.3f}, top-5 {metrics['top5']:.3f}"
        )
    return 0


def _set_steps(train, steps: int | None) -> None:
    """Apply `--steps` to a TrainConfig or VLMTrainConfig, refused where `train.epochs` says how long."""
    if steps is None:
        return
    if train.epochs is not None:
        raise ConfigError(
            f"--steps {steps} and train.epochs {train.epochs} both say how long to train; "
            "drop --steps, or set train.epochs: null"
        )
    train.steps = steps


def _reports_the_run() -> bool:
    """Whether this process prints a training run's summary: under `accelerate launch` the main one alone
    (the others trained the same run and would print it again, interleaved)."""
    from accelerate import PartialState

    return PartialState().is_main_process


def _print_run_length(skipped: list[tuple[str, str]], epochs: float | None, steps: int) -> None:
    """What both `train` verbs print first: the samples skipped, and the steps that epochs came to."""
    if skipped:
        print(f"skipped {len(skipped)} unreadable images:")
        for origin, reason in skipped:
            print(f"  {origin}: {reason}")
    if epochs is not None:
        print(f"train.epochs {epochs:g}: {steps} steps")


def _recalls(metrics: dict[str, float], direction: str) -> str:
    return " / ".join(f"{metrics[f'{direction}_R@{k}']:.3f}" for k in (1, 5, 10))


def _add_llm_route_commands(commands) -> None:
    train = commands.add_parser("train-vlm", help="train a VisionLLM: projector, then projector + LoRA")
    train.add_argument("--config", help="YAML VLM config (default: the offline default)")
    train.add_argument(
        "--data",
        required=True,
        help="LLaVA conversation .json, caption data, synthetic:N, or webdataset shards of LLaVA "
        "conversations or captions: 'shards/{00000..00127}.tar', a .txt list of shards, or a folder of .tar",
    )
    train.add_argument("--image-root", help="folder image paths are relative to (default: the data file's)")
    train.add_argument(
        "--out",
        type=output_directory,
        required=True,
        help="directory for the VisionLLM, checkpoints and logs",
    )
    train.add_argument("--base", help="a saved VisionLLM to start from (e.g. the stage 1 result)")
    train.add_argument("--stage", type=int, choices=(0, 1, 2), help="override train.stage")
    train.add_argument("--steps", type=positive_int, help="override train.steps")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    train.set_defaults(handler=_train_vlm)

    chat = commands.add_parser("chat", help="ask a VisionLLM about images")
    chat.add_argument("question")
    chat.add_argument("--model", required=True, help="a saved VisionLLM directory")
    chat.add_argument("--image", action="append", default=[], help="image file (repeatable, in order)")
    chat.add_argument(
        "--max-new-tokens", type=positive_int, default=64, help="longest reply in tokens (default: 64)"
    )
    chat.set_defaults(handler=_chat)

    export = commands.add_parser("export-llava", help="write a VisionLLM as a transformers LLaVA checkpoint")
    export.add_argument("model", help="a saved VisionLLM directory")
    export.add_argument(
        "out",
        type=output_directory,
        help="output directory for LlavaForConditionalGeneration + its processor",
    )
    export.set_defaults(handler=_export_llava)

    demo = commands.add_parser("demo-vlm", help="the LLM route end to end on the offline default")
    demo.add_argument(
        "--out",
        type=output_directory,
        default="demo-vlm-out",
        help="output directory (default: demo-vlm-out)",
    )
    demo.set_defaults(handler=_demo_vlm)


def _train_vlm(args) -> int:
    from bridge.config import VLMRunConfig
    from training.vlm import train_vlm

    config = load_config(args.config, VLMRunConfig) if args.config else VLMRunConfig()
    if args.stage is not None:
        config.train.stage = args.stage
    _set_steps(config.train, args.steps)
    _, result = train_vlm(config, args.data, args.out, args.resume, args.image_root, args.base)
    if not _reports_the_run():
        return 0
    _print_run_length(result.skipped, config.train.epochs, result.steps)
    for kind, accuracy in result.metrics.items():
        print(f"held-out answer accuracy, {kind}: {accuracy:.3f}")
    if result.best:
        name = result.best["best_metric"]
        print(
            f"kept step {result.best['best_step']} of {result.steps}, the best held-out {name} "
            f"({result.best[name]:.4f}); the last step scored {result.best[f'last_{name}']:.4f}"
        )
    print(f"saved the VisionLLM to {args.out}")
    return 0


def _chat(args) -> int:
    from bridge.vlm import VisionLLM

    model = VisionLLM.from_pretrained(args.model).eval()
    print(model.chat(args.question, args.image, max_new_tokens=args.max_new_tokens))
    return 0


def _export_llava(args) -> int:
    from bridge.llava_export import export_llava
    from bridge.vlm import VisionLLM

    out = export_llava(VisionLLM.from_pretrained(args.model), args.out)
    print(f"wrote {out}: load it with transformers.LlavaForConditionalGeneration and AutoProcessor")
    return 0


def _demo_vlm(args) -> int:
    from training.vlm_demo import run_vlm_demo

    result = run_vlm_demo(args.out)
    print(result.report())
    return 0


def _add_push_command(commands) -> None:
    push = commands.add_parser(
        "push", help="upload a saved bridge or VisionLLM to the Hugging Face Hub, with a model card"
    )
    push.add_argument("model", help="a saved bridge or VisionLLM directory (a training run's --out)")
    push.add_argument("repo_id", help="the Hub repository, owner/name (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--revision", help="the branch to push to (created if missing; default: main)")
    push.set_defaults(handler=_push)


def _push(args) -> int:
    from bridge.hub import push_to_hub

    url = push_to_hub(args.model, args.repo_id, private=args.private, revision=args.revision)
    print(f"pushed {args.model} to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
