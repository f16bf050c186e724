"""The synthetic shapes world: scenes of 1-3 coloured shapes with captions, masks and Q&A pairs.

It stands in for COCO where no data set can be downloaded: every scene is fully described by its
captions, every object has a pixel mask (for grounding), and every attribute can be asked about (for
the LLM route). Scene `i` of a world with seed `s` is the same on every machine and every run.

Not here: datasets or training (training/data.py wraps this for training).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 215, 40),
    "purple": (150, 60, 190),
    "orange": (250, 140, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = ("small", "large")
# The 3x3 grid of places, row by row, with the phrase a caption uses for each.
POSITIONS = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}
CLASS_NAMES = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)

_SCENE_TEMPLATES = ("{objects}", "a picture of {objects}", "an image showing {objects}", "there is {objects}")
_NUMBER_WORDS = ("zero", "one", "two", "three")


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    position: str  # a key of POSITIONS
    center: tuple[float, float]  # (x, y) in pixels
    radius: float

    @property
    def class_name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def phrase(self) -> str:
        """What a caption says of the object: "a small red circle in the top left"."""
        return f"a {self.size} {self.colour} {self.shape} {POSITIONS[self.position]}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int]
    image_size: int
    noise_seed: int
    key: str  # names the scene uniquely across worlds, e.g. for feature caches: "synthetic/0/112/42"

    @property
    def description(self) -> tuple:
        """What a caption says about the scene, order-free: scenes with equal descriptions look alike."""
        return tuple(sorted((o.size, o.colour, o.shape, o.position) for o in self.objects))

    def render(self) -> Image.Image:
        """The RGB image: shapes in order over a grey background with mild noise."""
        rng = np.random.default_rng(self.noise_seed)
        base = np.asarray(self.background, dtype=np.float32)
        noise = rng.normal(0.0, 6.0, (self.image_size, self.image_size, 1)).astype(np.float32)
        image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for obj in self.objects:
            _draw_shape(draw, obj, COLOURS[obj.colour])
        return image

    def masks(self) -> np.ndarray:
        """(n_objects, H, W) bool: the visible pixels of each object (later objects cover earlier)."""
        size = self.image_size
        masks = np.zeros((len(self.objects), size, size), dtype=bool)
        for i, obj in enumerate(self.objects):
            canvas = Image.new("L", (size, size), 0)
            _draw_shape(ImageDraw.Draw(canvas), obj, 255)
            masks[i] = np.asarray(canvas) > 0
            masks[:i] &= ~masks[i]
        return masks

    def label_map(self) -> np.ndarray:
        """(H, W) int: 0 for background, 1 + CLASS_NAMES.index(class) for object pixels."""
        labels = np.zeros((self.image_size, self.image_size), dtype=np.int64)
        for obj, mask in zip(self.objects, self.masks(), strict=True):
            labels[mask] = 1 + CLASS_NAMES.index(obj.class_name)
        return labels

    def captions(self, count: int = 4, seed: int = 0) -> list[str]:
        """`count` different captions, each naming every object's size, colour, shape and place."""
        rng = np.random.default_rng([self.noise_seed, seed])
        captions = []
        templates = rng.permutation(len(_SCENE_TEMPLATES))  # distinct wordings first, in a seeded order
        for k in range(count):
            phrases = [self.objects[i].phrase for i in rng.permutation(len(self.objects))]
            objects = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
            captions.append(_SCENE_TEMPLATES[templates[k % len(templates)]].format(objects=objects))
        return captions

    def questions(self) -> list[tuple[str, str, str]]:
        """(question, answer, kind) pairs about the scene; kind is colour, shape, position or count."""
        pairs = []
        for obj in self.objects:
            # Only ask where the question has one right answer in this scene.
            if sum(o.shape == obj.shape for o in self.objects) == 1:
                pairs.append((f"What colour is the {obj.shape}?", obj.colour, "colour"))
                pairs.append((f"Where is the {obj.shape}?", obj.position, "position"))
            if sum(o.colour == obj.colour for o in self.objects) == 1:
                pairs.append((f"What shape is the {obj.colour} object?", obj.shape, "shape"))
        pairs.append(("How many objects are there?", _NUMBER_WORDS[len(self.objects)], "count"))
        return pairs


class SyntheticWorld:
    """Deterministic scenes: `world.scene(i)` depends only on (seed, i, image_size)."""

    def __init__(self, seed: int = 0, image_size: int = 112, max_objects: int = 3):
        if not 1 <= max_objects <= 3:
            raise ValueError(f"scenes hold 1 to 3 objects; max_objects={max_objects} is out of range")
        self.seed = seed
        self.image_size = image_size
        self.max_objects = max_objects

    def scene(self, index: int) -> Scene:
        rng = np.random.default_rng([self.seed, index])
        size = self.image_size
        cell = size / 3
        count = int(rng.integers(1, self.max_objects + 1))
        places = rng.choice(len(POSITIONS), size=count, replace=False)
        objects = []
        for place in places:
            row, col = divmod(int(place), 3)
            scale = SIZES[rng.integers(len(SIZES))]
            radius = cell * (0.24 if scale == "small" else 0.42)
            slack = cell / 2 - radius  # jitter that keeps the shape inside its cell
            x = (col + 0.5) * cell + rng.uniform(-slack, slack)
            y = (row + 0.5) * cell + rng.uniform(-slack, slack)
            objects.append(
                SceneObject(
                    shape=SHAPES[rng.integers(len(SHAPES))],
                    colour=list(COLOURS)[rng.integers(len(COLOURS))],
                    size=scale,
                    position=list(POSITIONS)[place],
                    center=(float(x), float(y)),
                    radius=float(radius),
                )
            )
        grey = int(rng.integers(110, 170))
        key = f"synthetic/{self.seed}/{size}/{index}"
        return Scene(tuple(objects), (grey, grey, grey), size, int(rng.integers(2**31)), key)

    def scenes(self, start: int, count: int, distinct: bool = False) -> list[Scene]:
        """`count` scenes from index `start` on. With `distinct`, scenes whose description repeats an
        earlier one are passed over, so each caption has exactly one right image (evaluation galleries).
        """
        scenes, seen, index = [], set(), start
        while len(scenes) < count:
            scene = self.scene(index)
            index += 1
            if distinct and scene.description in seen:
                continue
            seen.add(scene.description)
            scenes.append(scene)
        return scenes


def _draw_shape(draw: ImageDraw.ImageDraw, obj: SceneObject, fill) -> None:
    x, y, r = obj.center[0], obj.center[1], obj.radius
    if obj.shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif obj.shape == "square":
        side = r * 0.85  # a square of the same "radius" looks bigger than a circle; even them out
        draw.rectangle((x - side, y - side, x + side, y + side), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(x, y - r), (x + r * 0.95, y + r * 0.8), (x - r * 0.95, y + r * 0.8)], fill=fill)
    elif obj.shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((x + radius * math.cos(angle), y + radius * math.sin(angle)))
        draw.polygon(points, fill=fill)
    else:
        raise ValueError(f"unknown shape '{obj.shape}'; known shapes: {', '.join(SHAPES)}")
