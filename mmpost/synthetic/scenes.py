"""The synthetic scenes: 1-3 shapes of one type (circle / square / triangle) and one colour (red / green / blue /
yellow) in distinct cells of a 3x3 grid, and what can be asked and answered about them.

Shapes never overlap or touch, so a count is unambiguous; colours are saturated and far apart, so the colour word
is too. Drawing uses PIL without antialiasing, so every pixel is either the background or the shape's exact colour
(``COLOURS``), which the tests rely on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 0, 0),
    "green": (0, 170, 0),
    "blue": (0, 0, 230),
    "yellow": (250, 210, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
TASKS: tuple[str, ...] = ("colour", "shape", "count")
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three"}

# Singular phrasings for one shape, plural for several, so every question reads as correct English.
_QUESTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "colour": (
        ("What colour is the shape?", "What color is the shape?", "Which colour is the shape?"),
        ("What colour are the shapes?", "What color are the shapes?", "Which colour are the shapes?"),
    ),
    "shape": (
        ("What shape is it?", "Which shape is shown?"),
        ("What shape are they?", "Which shape is shown?"),
    ),
    "count": (
        ("How many shapes are there?", "How many shapes are in the image?"),
        ("How many shapes are there?", "How many shapes are in the image?"),
    ),
}


@dataclass(frozen=True)
class Scene:
    """What one synthetic image shows: ``count`` shapes, all of type ``shape`` and colour ``colour``."""

    shape: str
    colour: str
    count: int

    def caption(self) -> str:
        plural = "s" if self.count > 1 else ""
        return f"{NUMBER_WORDS[self.count]} {self.colour} {self.shape}{plural}."

    def answer(self, task: str) -> str:
        """The short answer key of ``task``: ``"red"``, ``"circle"`` or ``"2"``."""
        return {"colour": self.colour, "shape": self.shape, "count": str(self.count)}[task]

    def reply(self, task: str) -> str:
        """The assistant's reply: a capitalised word with a period, or a digit."""
        return str(self.count) if task == "count" else f"{self.answer(task).capitalize()}."

    def question(self, task: str, rng: random.Random) -> str:
        return rng.choice(_QUESTIONS[task][self.count > 1])


def draw_scene(rng: random.Random, image_size: int = 64) -> tuple[Scene, Image.Image]:
    """Draws one random scene.

    Args:
        rng: the only source of randomness, so a seeded ``rng`` gives the same image every time.
        image_size: width and height in pixels (at least 32).

    Returns:
        The scene and its RGB image.
    """
    scene = Scene(shape=rng.choice(SHAPES), colour=rng.choice(list(COLOURS)), count=rng.randint(1, 3))
    cell = image_size // 3
    # 12-18 px at 64x64; the upper bound leaves >= 1 px of slack, so a shape fits inside its cell with a
    # one-pixel margin on every side and neighbours are always >= 2 px apart.
    max_size = min(round(image_size * 18 / 64), cell - 3)
    min_size = min(round(image_size * 12 / 64), max_size)
    background = tuple(rng.randint(228, 255) for _ in range(3))
    image = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(image)
    fill = COLOURS[scene.colour]
    for index in rng.sample(range(9), scene.count):
        row, col = divmod(index, 3)
        size = rng.randint(min_size, max_size)
        slack = cell - 2 - size
        x0 = col * cell + 1 + rng.randint(0, slack)
        y0 = row * cell + 1 + rng.randint(0, slack)
        x1, y1 = x0 + size - 1, y0 + size - 1  # PIL boxes are inclusive
        if scene.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif scene.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return scene, image
