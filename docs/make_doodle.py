"""Makes the README's doodle from a built-in example image.

Step 1 (`maps OUT`): writes into OUT
  - coffee.png: example:coffee at 256 px on the long side (the style);
  - coffee_sem.png: its semantic map, by k-means (numpy) of the blurred
    photo's colours into a few regions, cleaned by a mode filter, each
    region painted one flat colour (picked up beside coffee.png by the
    NAME_sem.png convention);
  - doodle.png: a "hand-drawn" map in the same colours: shapes with jittered
    outlines, as a user would paint them.
Step 2: run the doodle (the command the README shows, OUT/run as workdir).
Step 3 (`sheet OUT docs/doodle.jpg`): the style, its map, the doodle and
the result side by side.

    python docs/make_doodle.py maps OUT
    python -m cnnmrf_jax.main --flagfile=configs/doodle.flags \
        --style_image=OUT/coffee.png --content_map=OUT/doodle.png \
        --max_size=256 --num_res=2 --num_iter=50 --workdir=OUT/run
    python docs/make_doodle.py sheet OUT docs/doodle.jpg
"""

import pathlib
import sys

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFilter

from cnnmrf_jax import image_io

# One flat colour per region, darkest region first.
PALETTE = np.asarray([(40, 40, 120), (200, 120, 40), (240, 240, 240)],
                     np.uint8)
SIZE = 256


def kmeans(points: np.ndarray, k: int, *, iterations: int = 30,
           seed: int = 0) -> np.ndarray:
  """Labels [N] of points [N, D] by Lloyd's k-means from k random points."""
  rng = np.random.default_rng(seed)
  centres = points[rng.choice(len(points), k, replace=False)]
  for _ in range(iterations):
    labels = np.argmin(((points[:, None] - centres[None]) ** 2).sum(-1), 1)
    centres = np.stack([points[labels == j].mean(0) if np.any(labels == j)
                        else centres[j] for j in range(k)])
  return labels, centres


def style_and_map(out: pathlib.Path):
  rgb, _ = image_io.read_image("example:coffee", flag="style_image")
  height, width = rgb.shape[:2]
  scale = SIZE / max(height, width)
  size = (round(width * scale), round(height * scale))
  photo = Image.fromarray(np.round(rgb * 255).astype(np.uint8)).resize(
      size, Image.BICUBIC)
  photo.save(out / "coffee.png")
  blurred = np.asarray(photo.filter(ImageFilter.GaussianBlur(4)), np.float32)
  labels, centres = kmeans(blurred.reshape(-1, 3), len(PALETTE))
  # Darkest cluster gets the first colour, and so on.
  rank = np.argsort(np.argsort(centres.sum(1)))
  labels = rank[labels].reshape(blurred.shape[:2]).astype(np.uint8)
  labels = np.asarray(Image.fromarray(labels).filter(
      ImageFilter.ModeFilter(9)))
  Image.fromarray(PALETTE[labels]).save(out / "coffee_sem.png")


def _blob(cx, cy, rx, ry, rng, points=40):
  """A jittered ellipse outline: what a hand with a brush draws."""
  angles = np.linspace(0, 2 * np.pi, points, endpoint=False)
  radius = 1 + 0.025 * rng.standard_normal(points)
  return [(cx + rx * r * np.cos(a), cy + ry * r * np.sin(a))
          for a, r in zip(angles, radius)]


def doodle(out: pathlib.Path):
  rng = np.random.default_rng(1)
  image = Image.new("RGB", (SIZE, SIZE * 3 // 4), tuple(PALETTE[1]))
  draw = ImageDraw.Draw(image)
  # A dark band at the top, two white shapes with dark centres below it.
  band = [(0, 0), (SIZE, 0), (SIZE, 40)] + [
      (x, 40 + 10 * np.sin(x / 30) + 3 * rng.standard_normal())
      for x in range(SIZE, -1, -16)]
  draw.polygon(band, fill=tuple(PALETTE[0]))
  for cx, cy, r in ((80, 120, 55), (195, 135, 40)):
    draw.polygon(_blob(cx, cy, r, r * 0.8, rng), fill=tuple(PALETTE[2]))
    draw.polygon(_blob(cx, cy, r * 0.55, r * 0.45, rng),
                 fill=tuple(PALETTE[0]))
  image.save(out / "doodle.png")


def sheet(out: pathlib.Path, path: pathlib.Path):
  names = [("coffee.png", "style"), ("coffee_sem.png", "its map (k-means)"),
           ("doodle.png", "the doodle"), ("run/result.png", "result")]
  images = [np.asarray(Image.open(out / n).convert("RGB")) for n, _ in names]
  grid = image_io.contact_sheet(images, [label for _, label in names],
                                columns=4, cell=256)
  Image.fromarray(grid).save(path, quality=85)


def main(argv):
  if len(argv) < 3 or argv[1] not in ("maps", "sheet"):
    sys.exit(__doc__)
  out = pathlib.Path(argv[2])
  out.mkdir(parents=True, exist_ok=True)
  if argv[1] == "maps":
    style_and_map(out)
    doodle(out)
  else:
    sheet(out, pathlib.Path(argv[3]))


if __name__ == "__main__":
  main(sys.argv)
