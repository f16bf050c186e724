"""Domain shift on the offline default: adapt a trained bridge to held-back shapes and colours with LoRA.

The synthetic world is split in two domains. The old one: scenes whose every object is a circle, square
or triangle in red, green, blue or yellow. The new one: scenes whose every object is a star or purple or
orange, none of which the base bridge ever saw. A base bridge is trained on the old domain, then a LoRA
adapter (bridge/adapters.py) on a few thousand pairs of the new one, and compared, on held-out galleries
of both domains, with retraining the whole projector on the new pairs alone (what an adapter avoids: it
forgets the old domain). The adapter switched off gives the base's embeddings bit for bit; switched on,
the old domain drops by what the table says.

`python -m training.adapt_demo` prints the table; docs/adapters.md has the figures measured.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from bridge.config import AdapterSettings, RunConfig
from bridge.model import TextBridge
from bridge.synthetic import COLOURS, SHAPES, Scene, SyntheticWorld
from training.align import AlignmentData, CaptionedFeatures, evaluate_alignment, fit
from training.cache import FeatureCache, TextCache
from training.data import SYNTHETIC_CAPTIONS, Pair, synthetic_origin

log = logging.getLogger(__name__)

NEW_SHAPES = ("star",)
NEW_COLOURS = ("purple", "orange")
OLD_SHAPES = tuple(shape for shape in SHAPES if shape not in NEW_SHAPES)
OLD_COLOURS = tuple(colour for colour in COLOURS if colour not in NEW_COLOURS)
# Where each domain's scenes are drawn from: the galleries far past any training scene.
TRAIN_START, GALLERY_START = 0, 5 * 10**7


def is_old(scene: Scene) -> bool:
    """Every object of the scene is of a shape and a colour the base bridge is trained on."""
    return all(o.shape in OLD_SHAPES and o.colour in OLD_COLOURS for o in scene.objects)


def is_new(scene: Scene) -> bool:
    """Every object of the scene is of a held-back shape or colour: nothing the base has seen alone."""
    return all(o.shape in NEW_SHAPES or o.colour in NEW_COLOURS for o in scene.objects)


def domain_pairs(
    keep: Callable[[Scene], bool], count: int, start: int, seed: int = 0, distinct: bool = False
) -> list[Pair]:
    """The first `count` scenes from `start` on that `keep` accepts (`distinct`: no repeated
    description, so every caption of a gallery has one right image), as image-caption pairs."""
    world, pairs, seen, index = SyntheticWorld(seed), [], set(), start
    while len(pairs) < count:
        scene = world.scene(index)
        index += 1
        if not keep(scene) or (distinct and scene.description in seen):
            continue
        seen.add(scene.description)
        pairs.append(Pair(scene, scene.captions(SYNTHETIC_CAPTIONS), synthetic_origin(scene, seed)))
    return pairs


@dataclass
class Row:
    """One bridge of the comparison: its held-out text->image R@1 on each domain and what it trained."""

    name: str
    new_r1: float
    old_r1: float
    trained: int  # parameters trained for the new domain (0: none)
    size_bytes: int  # what has to be stored for the new domain (float32)


@dataclass
class AdaptDemoResult:
    rows: list[Row]
    projector_parameters: int
    adapter_off_bitwise: bool  # the adapter switched off embeds both galleries exactly as the base
    scenes: dict[str, int] = field(default_factory=dict)  # what each set held
    seconds: float = 0.0
    bridge_dir: Path | None = None

    def row(self, kind: str) -> Row:
        """The row of `kind`: base, retrained, adapter on or adapter off."""
        return self.rows[("base", "retrained", "adapter on", "adapter off").index(kind)]

    def report(self) -> str:
        lines = [
            f"{'bridge':<38}{'new R@1':>9}{'old R@1':>9}{'trained params':>20}{'stored':>10}",
            *(
                f"{r.name:<38}{r.new_r1:>9.3f}{r.old_r1:>9.3f}"
                f"{f'{r.trained:,} ({r.trained / self.projector_parameters:.1%})':>20}"
                f"{f'{r.size_bytes / 1024:.0f} KB':>10}"
                for r in self.rows
            ),
            "",
            f"text->image R@1 on held-out galleries of {self.scenes.get('gallery', 0)} scenes per domain; "
            f"percentages of the projector's {self.projector_parameters:,} parameters",
            "adapter off: embeddings bitwise equal to the base's"
            if self.adapter_off_bitwise
            else "adapter off: embeddings DIFFER from the base's",
        ]
        return "\n".join(lines)


def run_adapt_demo(
    out_dir: str | Path = "demo-out/adapt",
    base_scenes: int = 3000,
    new_pairs: int = 2000,
    gallery: int = 300,
    base_steps: int = 400,
    adapt_steps: int = 200,
    rank: int = 8,
    batch_size: int = 128,
    progress: bool = True,
) -> AdaptDemoResult:
    """Train the base on the old domain, adapt it to the new one, retrain a copy's projector on the new
    one alone, and score all three on both domains' galleries."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    config = RunConfig()
    train = replace(
        config.train, batch_size=batch_size, held_out=0, eval_every=0, checkpoint_every=0, warmup_steps=20
    )
    torch.manual_seed(train.seed)
    base = TextBridge.from_config(config.bridge)
    cache = out_dir / "cache"
    sets = {
        "old": domain_pairs(is_old, base_scenes, TRAIN_START),
        "new": domain_pairs(is_new, new_pairs, TRAIN_START),
        "old gallery": domain_pairs(is_old, gallery, GALLERY_START, distinct=True),
        "new gallery": domain_pairs(is_new, gallery, GALLERY_START, distinct=True),
    }
    data = {name: _captioned(base, pairs, cache, progress) for name, pairs in sets.items()}
    old, new = data["old gallery"], data["new gallery"]

    log.info("training the base bridge on the old domain")
    fit(
        base,
        AlignmentData(data["old"], old),
        replace(train, steps=base_steps),
        out_dir / "base",
        progress=progress,
    )
    base.eval()
    base_embeddings = _embeddings(base, old, new)
    projector_parameters = sum(p.numel() for p in base.projector.parameters())
    rows = [Row("base (old domain only)", _r1(base, new), _r1(base, old), 0, 0)]

    log.info("retraining a copy of the base's projector on the new domain alone")
    retrained = TextBridge(base.config, base.encoder, base.tower, copy.deepcopy(base.projector))
    with torch.no_grad():
        retrained.logit_scale.copy_(base.logit_scale)
        retrained.logit_bias.copy_(base.logit_bias)
    new_train = AlignmentData(data["new"], new)
    fit(retrained, new_train, replace(train, steps=adapt_steps), out_dir / "retrained", progress=progress)
    retrained.eval()
    rows.append(
        Row(
            "projector retrained on new pairs only",
            _r1(retrained, new),
            _r1(retrained, old),
            projector_parameters,
            projector_parameters * 4,
        )
    )

    log.info("training a LoRA adapter on the new domain")
    settings = AdapterSettings(r=rank, alpha=2 * rank)
    base.add_adapter("new", settings)
    lora = replace(train, steps=adapt_steps, lora=settings)
    fit(base, new_train, lora, out_dir / "adapter", progress=progress)
    base.eval()
    adapter_parameters = sum(v.numel() for v in base.adapters.weights("new").values())
    rows.append(
        Row(
            f"LoRA adapter r={rank} on it, on",
            _r1(base, new),
            _r1(base, old),
            adapter_parameters,
            adapter_parameters * 4,
        )
    )
    base.set_adapter(None)
    off = _embeddings(base, old, new)
    bitwise = all(torch.equal(a, b) for a, b in zip(base_embeddings, off, strict=True))
    rows.append(Row(f"LoRA adapter r={rank} on it, off", _r1(base, new), _r1(base, old), 0, 0))
    base.set_adapter("new")
    base.save_pretrained(out_dir / "bridge")
    counts = {"old": base_scenes, "new": new_pairs, "gallery": gallery}
    seconds = time.perf_counter() - start
    return AdaptDemoResult(rows, projector_parameters, bitwise, counts, seconds, out_dir / "bridge")


def _captioned(bridge: TextBridge, pairs: list[Pair], cache: Path, progress: bool) -> CaptionedFeatures:
    features = FeatureCache(cache, bridge.encoder).features(pairs, progress=progress)
    return CaptionedFeatures.build(features, TextCache(cache, bridge.tower, progress))


def _r1(bridge: TextBridge, data: CaptionedFeatures) -> float:
    return evaluate_alignment(bridge, data)["text_to_image_R@1"]


@torch.no_grad()
def _embeddings(bridge: TextBridge, *sets: CaptionedFeatures) -> list[torch.Tensor]:
    """Each gallery's image embeddings (the projector is in eval mode here)."""
    return [bridge.encode_image(data.features[list(range(len(data.features)))]) for data in sets]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = {name: p.default for name, p in inspect.signature(run_adapt_demo).parameters.items()}
    for name in (
        "out_dir",
        "base_scenes",
        "new_pairs",
        "gallery",
        "base_steps",
        "adapt_steps",
        "rank",
        "batch_size",
    ):
        kind = str if name == "out_dir" else int
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=defaults[name])
    args = parser.parse_args(argv)
    result = run_adapt_demo(**vars(args))
    print(result.report())
    print(f"\nadapted bridge (base + adapter 'new'): {result.bridge_dir}  ({result.seconds:.0f} s in all)")


if __name__ == "__main__":
    main()
