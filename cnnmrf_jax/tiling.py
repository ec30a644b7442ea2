"""Exact tiled evaluation of the objective: value and gradient tile by tile.

Every term of CNNMRF is local in feature space. A VGG feature at map
position q of a layer of total stride s depends only on the input pixels
[s q - before, s q + after] (`vgg.receptive_field`: 38 before and 45 after
at relu4_2, an 84 px field; 30 and 37 at relu4_1). The MRF matching of a
synthesis patch depends only on that patch and the (global) style bank, and
the overlap-averaged target Tbar at a position only on the patches covering
it. The content term is a sum over positions and the smoothness prior one
over pixels. So the image is cut into square cores of `tile_size` pixels; a
tile is its core grown by a `halo` on every side, enough for the receptive
field of the deepest layer read plus, at each MRF layer, the k - 1 map
positions a patch overlapping the core reaches beyond it. Tile origins are
multiples of the total stride of the deepest layer read, so every pooling
window of a crop is one of the whole image's; where a crop passes the
image border the VGG zeroes every map outside the image before each
convolution and pool (`vgg.VGG`'s window), which is the whole image's zero
padding and ceil-mode pooling. A crop's features are then the whole image's
on its core, exactly.

Why each term is evaluated on a tile's core rather than assembling the
whole image's features from tiles: assembled, every layer's whole map lives
at once (and the backward pass keeps the activations of every tile); on
cores, only one tile's VGG activations exist at a time. Per tile:
  - MRF (Li & Wand 2016, Eq. 2): the whole map's grid patches (stride plus
    tail, as untiled) that overlap the core are extracted from the crop,
    matched against the global bank and folded; as every patch covering a
    core position is among them, sum and count, hence Tbar, are the whole
    image's on the core, and the core's share of
    w/2 sum (F - Tbar)^2 is exact. The patches of the ring of width k - 1
    around the core are matched by both neighbouring tiles (the price of
    exactness without a second pass); statistics count only the patches
    whose corner lies in the core.
    With PatchMatch (--matching=patchmatch) the field is the whole grid's,
    passed from tile to tile in row-major order: a tile improves its
    patches' matches and writes back those it owns; the ring patches it
    does not own lie above or left of its core, so their owners came
    earlier and the tile folds their matches, not its own. Each patch then
    has one match wherever it is folded, and the field carried to the next
    evaluation is the one the loss used (terms.py `_mrf_tile_loss`).
  - content (Eq. 4): the core's squared error over the whole map's size.
  - terms that read no features (the smoothness prior, Eq. 5) run on the
    whole image, untiled: they cost a few image-sized arrays.
Tiles are a leading axis scanned one at a time (lax.scan, static shapes:
every crop has the same padded size) inside the jitted objective. Each step
takes the tile's value and its vector-Jacobian product with respect to the
crop and adds it into the image's gradient, so the backward pass needs no
stored activations; the tiled part is a jax.custom_vjp whose forward pass
runs the scan and whose backward pass scales the summed gradient. Nothing
is approximated, so there are no seams.

The tile axis runs sequentially on each device; the batch axis of pairs is
what a mesh shards (batch.py). Sharding tiles instead would need each
device's partial gradients summed across the mesh (a psum after the scan).

`tile_size` (--tile_size): 'auto' tiles only a level whose untiled memory
estimate (memory.py) does not fit, with the largest tile that does; '0'
never tiles; a number is the core's side in pixels, a multiple of the total
stride of the deepest layer read (8 for relu4_x).
"""

import dataclasses
import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from cnnmrf_jax import config as config_lib
from cnnmrf_jax import patches
from cnnmrf_jax import vgg

Size = Tuple[int, int]
AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class Tiling:
  """How one level's image is cut.

  tile_size: the core's side in pixels. halo: pixels added on every side.
  stride: the total stride of the deepest layer read (tile_size and halo
  are multiples of it). grid: (rows, cols) of tiles; the last ones may
  reach past the image.
  """
  tile_size: int
  halo: int
  stride: int
  grid: Size

  @property
  def crop(self) -> int:
    """Side in pixels of every tile's crop (core and halo)."""
    return self.tile_size + 2 * self.halo

  @property
  def num_tiles(self) -> int:
    return self.grid[0] * self.grid[1]


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def stride_and_halo(config: config_lib.Config) -> Tuple[int, int]:
  """(stride, halo) in pixels for a config's feature layers.

  stride: the total stride of the deepest layer any term reads. halo: the
  largest reach of a core position's receptive field beyond the core
  (before or after, `vgg.receptive_field`), at MRF layers plus the
  patch_size - 1 map positions of a patch overlapping the core, rounded up
  to the stride.
  """
  layers = config.feature_layers()
  if not layers:
    return 1, 0
  stride = max(vgg.downsampling_of(l, config.network) for l in layers)
  reach = 0
  for layer in layers:
    before, after, step = vgg.receptive_field(layer, config.network)
    margin = 0
    if (config.mode in ("transfer", "texture", "doodle") and
        layer in config.mrf_layers):
      margin = (config.patch_size - 1) * step
    reach = max(reach, before + margin, after + margin)
  return stride, _round_up(reach, stride)


def parse_tile_size(config: config_lib.Config) -> Optional[int]:
  """--tile_size as a number of pixels (0: never), or None for auto.

  Raises ConfigError naming the flag for anything else, or a size that is
  not a multiple of the deepest layer's stride.
  """
  text = str(config.tile_size).strip().lower()
  if text == AUTO:
    return None
  try:
    value = int(text)
  except ValueError:
    value = -1
  if value < 0:
    raise config_lib.ConfigError(
        f"--tile_size: expected auto, 0 (never tile) or a tile side in "
        f"pixels, got {config.tile_size!r}")
  stride, _ = stride_and_halo(config)
  if value % stride:
    raise config_lib.ConfigError(
        f"--tile_size: {value} is not a multiple of {stride}, the total "
        f"stride of the deepest layer read; try {_round_up(value, stride)}")
  return value


def make(config: config_lib.Config, size: Size,
         tile_size: int) -> Optional[Tiling]:
  """The tiling of a [height, width] image in cores of tile_size pixels,
  or None when tile_size is 0 or one core holds the whole image."""
  height, width = size
  if tile_size <= 0 or tile_size >= max(height, width):
    return None
  stride, halo = stride_and_halo(config)
  if tile_size % stride:
    raise config_lib.ConfigError(
        f"--tile_size: {tile_size} is not a multiple of {stride}")
  return Tiling(tile_size, halo, stride,
                (-(-height // tile_size), -(-width // tile_size)))


def candidate_sizes(config: config_lib.Config, size: Size) -> Sequence[int]:
  """Tile sides `auto` tries, largest first: the long side split into
  2, 3, 4, ... cores (rounded up to the stride), down to the halo (smaller
  cores would be mostly halo)."""
  stride, halo = stride_and_halo(config)
  long_side = max(size)
  found = []
  parts = 2
  while True:
    tile = _round_up(-(-long_side // parts), stride)
    if tile < max(stride, halo):
      break
    if tile not in found and tile < long_side:
      found.append(tile)
    parts += 1
  return found or [_round_up(max(stride, halo), stride)]


# ----------------------------------------------------------------------------
# Geometry on the device.


@dataclasses.dataclass(frozen=True)
class LayerTile:
  """A tile seen from one layer's map (stride s): static sizes and the
  traced position of its core in the whole map.

  map_size: the whole map's (h, w). halo, core: the halo and core sides in
  map positions; the core starts at (halo, halo) of the crop's map, whose
  side is core + 2 * halo. origin: (row, col) of the core's first position
  in the whole map (traced int32).
  """
  stride: int
  map_size: Size
  halo: int
  core: int
  origin: Tuple[Any, Any]
  index: Tuple[Any, Any]


@dataclasses.dataclass(frozen=True)
class Tile:
  """What a term's tile_loss sees: one tile of the whole image.

  tiling: the level's `Tiling`. image_size: the whole image's (H, W).
  index: (row, col) of the tile (traced int32).
  """
  tiling: Tiling
  image_size: Size
  index: Tuple[Any, Any]

  def layer(self, layer: str, network: str = "vgg19") -> LayerTile:
    stride = vgg.downsampling_of(layer, network)
    core = self.tiling.tile_size // stride
    return LayerTile(stride, vgg.map_size(*self.image_size, layer, network),
                     self.tiling.halo // stride, core,
                     (self.index[0] * core, self.index[1] * core),
                     self.index)


def grid_tables(map_side: int, num_tiles: int, core: int, halo: int,
                patch_size: int, stride: int
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per tile along one axis, the whole map's grid patches overlapping it.

  For tile t (core [t core, (t + 1) core) of a map of side map_side), the
  patch corners g of `patches.grid_positions` with
  t core - patch_size < g < (t + 1) core, as crop-local corners
  g - (t core - halo). Returns int32 [num_tiles, n] local corners, bool
  [num_tiles, n] valid (False on padding up to the largest count n) and
  bool [num_tiles, n] owned (corner inside the core).
  """
  grid = patches.grid_positions(map_side, patch_size, stride)
  lists = []
  for t in range(num_tiles):
    start, stop = t * core, (t + 1) * core
    lists.append([g for g in grid if start - patch_size < g < stop])
  n = max(1, max(len(l) for l in lists))
  local = np.zeros((num_tiles, n), np.int32)
  valid = np.zeros((num_tiles, n), bool)
  owned = np.zeros((num_tiles, n), bool)
  for t, corners in enumerate(lists):
    offset = t * core - halo
    for i, g in enumerate(corners):
      local[t, i] = g - offset
      valid[t, i] = True
      owned[t, i] = t * core <= g < (t + 1) * core
    if corners:  # padding repeats a real corner, masked out
      local[t, len(corners):] = corners[0] - offset
  return local, valid, owned


def grid_index_tables(map_side: int, num_tiles: int, core: int, halo: int,
                      patch_size: int, stride: int) -> np.ndarray:
  """`grid_tables`' corners as indices into the whole map's grid.

  int32 [num_tiles, n]: for tile t, the position in
  `patches.grid_positions(map_side, ...)` of each of its corners (padding
  repeats a real corner's, as there). Whatever the whole map has per grid
  patch (a `patches.SynthesisMap`'s rows: [rows * cols, ...] row-major)
  is taken for a tile's patches with these, row index times the grid's
  number of columns plus column index.
  """
  local, _, _ = grid_tables(map_side, num_tiles, core, halo, patch_size,
                            stride)
  grid = patches.grid_positions(map_side, patch_size, stride)
  offsets = np.arange(num_tiles)[:, None] * core - halo
  index = np.searchsorted(grid, local + offsets)
  # Only tiles with no corner at all (a core past a tiny map) miss.
  index = np.minimum(index, len(grid) - 1)
  return index.astype(np.int32)


def core_slice(array: jnp.ndarray, layer_tile: LayerTile) -> jnp.ndarray:
  """The tile's core of a whole map [h, w, ...] (zero past its end):
  [core, core, ...]."""
  core = layer_tile.core
  h, w = array.shape[:2]
  grid_h = -(-h // core) * core
  grid_w = -(-w // core) * core
  pad = [(0, grid_h - h), (0, grid_w - w)] + [(0, 0)] * (array.ndim - 2)
  padded = jnp.pad(array, pad)
  start = (layer_tile.origin[0], layer_tile.origin[1]) + (0,) * (
      array.ndim - 2)
  return lax.dynamic_slice(padded, start, (core, core) + array.shape[2:])


def core_inside(layer_tile: LayerTile) -> jnp.ndarray:
  """[core, core, 1] bool: which core positions lie inside the whole map."""
  core = layer_tile.core
  rows = lax.broadcasted_iota(jnp.int32, (core, 1, 1), 0)
  cols = lax.broadcasted_iota(jnp.int32, (1, core, 1), 1)
  h, w = layer_tile.map_size
  return ((rows + layer_tile.origin[0] < h) &
          (cols + layer_tile.origin[1] < w))


# ----------------------------------------------------------------------------
# The tiled objective.


def tiled_objective(tiling: Tiling, tile_loss: Callable[..., Any],
                    with_state: bool = False):
  """The sum over tiles of tile_loss, with its gradient, as one function.

  tile_loss(crop [c, c, 3], window (top, left, H, W), tile: Tile, *args)
  -> (value, aux): the tile's share of the objective from its crop (c =
  tiling.crop) and any pytree aux of sums (values, partial statistics).
  Returns f(x [H, W, 3], *args) -> (total, aux summed over tiles), whose
  derivative with respect to x is the sum of the tiles' vector-Jacobian
  products (computed in the forward pass, one tile at a time). args are
  not differentiated (their cotangent is zero).

  with_state: tile_loss(crop, window, tile, state, *args) -> (value, (aux,
  state)) instead, and f(x, state, *args) -> (total, (aux, state)): a
  pytree of whole-image state (PatchMatch's field, terms.py) passed from
  each tile to the next in row-major order, so a tile reads what the tiles
  above and to its left wrote this evaluation. Not differentiated.
  """
  crop, halo, tile_size = tiling.crop, tiling.halo, tiling.tile_size
  rows, cols = tiling.grid

  def run(x, state, args, with_grad):
    height, width, channels = x.shape
    # Padded so every crop is in bounds; what lies outside the image is
    # masked inside the VGG, so the padding's value does not matter.
    padded = jnp.pad(x, ((halo, rows * tile_size + halo - height),
                         (halo, cols * tile_size + halo - width), (0, 0)))

    def tile_of(index):
      row, col = index // cols, index % cols
      tile = Tile(tiling, (height, width), (row, col))
      window = (row * tile_size - halo, col * tile_size - halo, height,
                width)
      piece = lax.dynamic_slice(padded, (row * tile_size, col * tile_size,
                                         0), (crop, crop, channels))
      return tile, window, piece, (row * tile_size, col * tile_size)

    def value_of(piece, window, tile, state):
      """(value, (aux, state)) whether or not tile_loss keeps state."""
      if with_state:
        return tile_loss(piece, window, tile, state, *args)
      value, aux = tile_loss(piece, window, tile, *args)
      return value, (aux, state)

    def first_value(index):
      tile, window, piece, _ = tile_of(index)
      return value_of(piece, window, tile, state)

    # (value, aux) summed over tiles, from zeros of their shapes.
    value_shape, (aux_shape, _) = jax.eval_shape(first_value, jnp.int32(0))
    sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                        (value_shape, aux_shape))
    grad = jnp.zeros_like(padded) if with_grad else None

    def body(carry, index):
      grad, sums, state = carry
      tile, window, piece, corner = tile_of(index)
      if with_grad:
        (value, (out, state)), piece_grad = jax.value_and_grad(
            lambda p: value_of(p, window, tile, state), has_aux=True)(piece)
        start = (corner[0], corner[1], 0)
        grad = lax.dynamic_update_slice(
            grad, lax.dynamic_slice(grad, start, piece.shape) + piece_grad,
            start)
      else:
        value, (out, state) = value_of(piece, window, tile, state)
      sums = jax.tree.map(jnp.add, sums, (value, out))
      return (grad, sums, state), None

    (grad, (total, sums), state), _ = lax.scan(
        body, (grad, sums, state), jnp.arange(rows * cols, dtype=jnp.int32))
    if with_grad:
      grad = grad[halo:halo + height, halo:halo + width]
    return (total, sums, state), grad

  @jax.custom_vjp
  def objective(x, state, args):
    (total, aux, state), _ = run(x, state, args, with_grad=False)
    return total, (aux, state)

  def forward(x, state, args):
    (total, aux, state), grad = run(x, state, args, with_grad=True)
    return (total, (aux, state)), grad

  def backward(grad, cotangents):
    # aux holds sums for the log, state the tiles' carried state: neither
    # is differentiated.
    total_cotangent, _ = cotangents
    return (total_cotangent * grad, None, None)

  objective.defvjp(forward, backward)
  if with_state:
    return lambda x, state, *args: objective(x, state, args)

  def stateless(x, *args):
    total, (aux, _) = objective(x, (), args)
    return total, aux
  return stateless
