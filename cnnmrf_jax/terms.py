"""The objective as a sum of named, registered terms.

CNNMRF minimises (Li & Wand 2016, Eq. 1)

    E(x) = E_s(Phi(x), Phi(x_s)) + a1 E_c(Phi(x), Phi(x_c)) + a2 Y(x)

over the pixels x. Each summand is a `Term`: which configs it is part of,
which VGG layers it reads from x, its per-pair weights, how its targets are
built at a pyramid level (on the host, once per level), and its loss, a pure
function of the image, the features, its own targets and its weights. The
terms here are the MRF term (Eq. 2), the content term (Eq. 4), the Gram
style term of Gatys et al. (the baseline), the smoothness prior (Eq. 5) and,
for videos, the temporal term of Ruder et al. (2016).

Adding a term is writing those functions and calling `register`; the pyramid
driver, the target builder and the solve loop loop over `active_terms` and
need no edit. A term may also keep state from one evaluation to the next
(the MRF term's PatchMatch field): its targets then hold it under `CARRY`,
its loss returns the next one, the objective puts it in its aux, and the
solver step writes it back into the targets (`with_carry`), so it lives on
the device in the optimiser state and is checkpointed with it; the next
level's target builder sees the last one (`PairLevel.carried`).
`make_objective` builds, once, from a frozen config, the pure function the
optimiser minimises; given a tiling of a level (tiling.py), it evaluates
every feature-reading term tile by tile through the term's `tile_loss`,
exactly.
"""

import collections
import contextlib
import dataclasses
import math
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from cnnmrf_jax import augment
from cnnmrf_jax import config as config_lib
from cnnmrf_jax import image_io
from cnnmrf_jax import losses
from cnnmrf_jax import patches
from cnnmrf_jax import patchmatch as patchmatch_lib
from cnnmrf_jax import semantic
from cnnmrf_jax import temporal
from cnnmrf_jax import tiling as tiling_lib
from cnnmrf_jax import vgg

Scalars = Dict[str, jnp.ndarray]


@dataclasses.dataclass
class PairLevel:
  """What a term's target builder sees: one pair at one pyramid level.

  config: the pair's own config (a sweep's batch may differ per pair in
    `batch.PER_PAIR_FIELDS`). level: the `plan.LevelPlan`. pair: the pair's
    index. content: the content image resized to the level [h, w, 3] RGB in
    [0, 1], or None. styles: the style images as read. extras: per-pair
    inputs of terms beyond images (e.g. a video's previous frames).
    features: rgb [H, W, 3] -> {layer: [h, w, c]} through the VGG. plan: the
    whole `plan.Plan` (batch-wide sizes such as the padded bank size).
    carried: {term name: the pair's `CARRY` at the end of the previous
    level (numpy pytree)} for the terms that kept one; empty at a run's
    first level.
  """
  config: config_lib.Config
  level: Any
  pair: int
  content: Optional[np.ndarray]
  styles: Sequence[np.ndarray]
  extras: Dict[str, Any]
  features: Callable[[np.ndarray], Dict[str, jnp.ndarray]]
  plan: Any
  carried: Dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Term:
  """One named term of the objective.

  name: the log's name; a loss's values are logged as NAME_KEY (NAME alone
    for the key ''). active(config): whether the term is part of the run.
  layers(config): the VGG layers its loss reads from the synthesis image.
  weights(config): its per-pair weights, a pytree of float32 scalars passed
    to the objective as arguments (pairs with other weights share one
    compiled program). build(pair_level): its targets for one pair at one
    level, a pytree of arrays of the same shapes for every pair of a batch.
  loss(config, x, features, targets, weights) -> (values, stats): x
    [H, W, 3] the preprocessed image, features {layer: [h, w, c]} float32;
    values {key: scalar} summed into the objective, stats {name: scalar}
    logged only. When its targets hold a `CARRY` (its build put one
    there), loss returns (values, stats, carry): the carry of the next
    evaluation, same structure, no gradient.
  tile_loss(config, tile, features, targets, weights) -> (values, partial):
    the share of `loss` of one tile's core (tiling.py): tile a
    `tiling.Tile`, features {layer: [c, c, ch]} of the tile's crop (exact
    on the core); the values of all tiles sum to loss's values, and
    tile_stats(config, summed partial) -> stats. None: the term cannot be
    tiled (a term that reads no features never is: it runs on the whole
    image). A term whose targets hold a `CARRY` is tiled with a state
    passed from tile to tile (`tiling.tiled_objective`'s with_state):
    tile_state(config, carry) -> the first tile's state; tile_loss then
    takes it as the keyword `state` and returns (values, partial, state);
    tile_carry(config, carry, last tile's state) -> the next evaluation's
    carry.
  """
  name: str
  active: Callable[[config_lib.Config], bool]
  layers: Callable[[config_lib.Config], Sequence[str]]
  weights: Callable[[config_lib.Config], Any]
  build: Callable[[PairLevel], Any]
  loss: Callable[..., Tuple[Scalars, Scalars]]
  tile_loss: Optional[Callable[..., Tuple[Scalars, Any]]] = None
  tile_stats: Optional[Callable[..., Scalars]] = None
  tile_state: Optional[Callable[..., Any]] = None
  tile_carry: Optional[Callable[..., Any]] = None


_REGISTRY: Dict[str, Term] = {}

# The key of a term's targets that holds its state between evaluations.
CARRY = "carry"


def register(term: Term) -> Term:
  """Adds a term to every objective built from now on (in this order)."""
  if term.name in _REGISTRY or term.name == "weights":
    raise ValueError(f"a term named {term.name!r} is already registered")
  _REGISTRY[term.name] = term
  return term


def unregister(name: str) -> None:
  del _REGISTRY[name]


@contextlib.contextmanager
def registered(term: Term) -> Iterator[Term]:
  """`register` for the duration of a with block (tests, notebooks)."""
  register(term)
  try:
    yield term
  finally:
    unregister(term.name)


def active_terms(config: config_lib.Config) -> List[Term]:
  return [t for t in _REGISTRY.values() if t.active(config)]


def feature_layers(config: config_lib.Config) -> Tuple[str, ...]:
  """Every VGG layer the objective reads, sorted."""
  return tuple(sorted({l for t in active_terms(config)
                       for l in t.layers(config)}))


def loss_weights(config: config_lib.Config) -> Dict[str, Any]:
  """One pair's weights of every active term, {term name: pytree}."""
  return {t.name: t.weights(config) for t in active_terms(config)}


def untileable_terms(config: config_lib.Config) -> List[str]:
  """Active terms that read features but have no tile_loss."""
  return [t.name for t in active_terms(config)
          if t.layers(config) and t.tile_loss is None]


def with_carry(targets: Dict[str, Any], carry: Dict[str, Any]
               ) -> Dict[str, Any]:
  """targets with each term's `CARRY` replaced by carry[term name] (an
  objective's aux['carry']): what the next evaluation starts from."""
  if not carry:
    return targets
  targets = dict(targets)
  for name, state in carry.items():
    targets[name] = {**targets[name], CARRY: state}
  return targets


def _loss_parts(result) -> Tuple[Scalars, Scalars, Any]:
  """A term loss's (values, stats[, carry]) as a triple (carry None)."""
  if len(result) == 3:
    return tuple(result)
  values, stats = result
  return values, stats, None


def make_objective(config: config_lib.Config, model: Any,
                   tiling_of: Optional[Callable[[Tuple[int, int]], Any]]
                   = None):
  """The objective of one pair, built once from a frozen config.

  Returns objective(x, params, targets) -> (loss, aux): x [H, W, 3]
  preprocessed; targets {term name: its targets, 'weights': {term name: its
  weights}}; aux = {'terms': {name: scalar}, 'stats': {name: scalar},
  'carry': {term name: its next `CARRY`}} ('carry' empty when no term keeps
  one). The terms are summed in registration order.

  tiling_of((H, W)) -> `tiling.Tiling` or None, asked when the objective is
  traced for an image size: with a tiling, the terms that read features are
  evaluated tile by tile (`tiling.tiled_objective`; same value and gradient
  up to float rounding, with respect to x only) and the others on the whole
  image.
  """
  terms = active_terms(config)
  layers = feature_layers(config)

  def objective(x, params, targets):
    tiling = tiling_of(tuple(x.shape[:2])) if tiling_of else None
    if tiling is not None:
      return _tiled(x, params, targets, tiling)
    features = float32(model.apply({"params": params}, x[None],
                                   outputs=layers))
    features = {k: v[0] for k, v in features.items()}
    values, stats, carry = {}, {}, {}
    for term in terms:
      term_values, term_stats, term_carry = _loss_parts(term.loss(
          config, x, features, targets[term.name],
          targets["weights"][term.name]))
      for key, value in term_values.items():
        values[f"{term.name}_{key}" if key else term.name] = value
      stats.update(term_stats)
      if term_carry is not None:
        carry[term.name] = jax.lax.stop_gradient(term_carry)
    total = sum(values.values())
    return total, {"terms": values, "stats": stats, "carry": carry}

  feature_terms = [t for t in terms if t.layers(config)]

  def carried(targets):
    """The feature-reading terms whose targets hold a `CARRY`."""
    return [t for t in feature_terms if isinstance(targets[t.name], dict)
            and CARRY in targets[t.name]]

  def tile_loss(piece, window, tile, state, params, targets):
    features = float32(model.apply({"params": params}, piece[None],
                                   outputs=layers, window=window))
    features = {k: v[0] for k, v in features.items()}
    values, partial, next_state = {}, {}, {}
    for term in feature_terms:
      args = (config, tile, features, targets[term.name],
              targets["weights"][term.name])
      if term.name in state:
        (values[term.name], partial[term.name],
         next_state[term.name]) = term.tile_loss(*args,
                                                 state=state[term.name])
      else:
        values[term.name], partial[term.name] = term.tile_loss(*args)
    return sum(jax.tree.leaves(values)), ((values, partial), next_state)

  def _tiled(x, params, targets, tiling):
    untileable = untileable_terms(config)
    if untileable:
      raise config_lib.ConfigError(
          f"--tile_size: the term(s) {untileable} cannot be tiled; pass "
          "--tile_size=0")
    keeping = carried(targets)
    state = {t.name: t.tile_state(config, targets[t.name][CARRY])
             for t in keeping}
    total, ((tiled_values, partial), state) = tiling_lib.tiled_objective(
        tiling, tile_loss, with_state=True)(x, state, params, targets)
    values, stats = {}, {}
    for term in terms:  # registration order, as untiled
      if term.layers(config):
        term_values = tiled_values[term.name]
        stats.update(term.tile_stats(config, partial[term.name]))
      else:
        term_values, term_stats, _ = _loss_parts(term.loss(
            config, x, {}, targets[term.name],
            targets["weights"][term.name]))
        stats.update(term_stats)
        total = total + sum(term_values.values())
      for key, value in term_values.items():
        values[f"{term.name}_{key}" if key else term.name] = value
    carry = {t.name: jax.lax.stop_gradient(t.tile_carry(
        config, targets[t.name][CARRY], state[t.name])) for t in keeping}
    return total, {"terms": values, "stats": stats, "carry": carry}

  return objective


def float32(features):
  """Losses and targets stay float32 whatever --dtype the VGG runs in."""
  return jax.tree.map(lambda f: f.astype(jnp.float32), features)


def _scalar(value: float) -> np.ndarray:
  return np.float32(value)


# ----------------------------------------------------------------------------
# The MRF term (Li & Wand 2016, Eq. 2).


MRF_NAME = "mrf"


def _mrf_active(config):
  return config.mode in ("transfer", "texture", "doodle")


def _mrf_weights(config):
  return {layer: _scalar(w) for layer, w in zip(
      config.mrf_layers, config.mrf_weights_per_layer())}


def _pad_bank(bank: patches.PatchBank, size: int) -> patches.PatchBank:
  """The bank with rows appended up to `size` that are never matched
  (valid False), so pairs whose styles differ in size share one batch."""
  missing = size - bank.patches.shape[0]
  if missing == 0:
    return bank
  padded = patches.PatchBank(
      patches=jnp.pad(bank.patches, ((0, missing), (0, 0))),
      inv_norms=jnp.pad(bank.inv_norms, (0, missing)),
      valid=jnp.pad(bank.valid, (0, missing)))
  if bank.map_patches is None:
    return padded
  return padded._replace(
      map_patches=jnp.pad(bank.map_patches, ((0, missing), (0, 0))),
      labels=jnp.pad(bank.labels, (0, missing)))


def _uses_maps(pair: PairLevel) -> bool:
  """Whether the pair has semantic maps and they count (weight > 0); at
  weight 0 the targets, and so the matching, are exactly those without."""
  return (pair.config.semantic_weight > 0 and
          pair.extras.get("style_maps") is not None)


def _mrf_build(pair: PairLevel):
  """{layer: PatchBank} of every copy of every style image at this level.

  With semantic maps (`_uses_maps`) each bank also carries its patches' map
  part (each style map resized and augmented with its image), and the
  targets gain 'synthesis_maps': {layer: patches.SynthesisMap}, the content
  map's patches on the synthesis grid, constant for the level.
  """
  config = pair.config
  with_maps = _uses_maps(pair)
  maps = collections.defaultdict(list)
  label_maps = collections.defaultdict(list)
  planned = pair.level.copies[pair.pair]
  made = []
  for index, (style, size) in enumerate(zip(pair.styles,
                                            pair.level.styles[pair.pair])):
    resized = np.asarray(image_io.resize(style, *size, method="torch"))
    copies = augment.augment_style(resized,
                                   num_rotations=config.num_rotations,
                                   num_scales=config.num_scales)
    made += copies
    for copy in copies:
      copy_features = pair.features(copy)
      for layer in config.mrf_layers:
        maps[layer].append(copy_features[layer])
    if with_maps:
      map_copies = semantic.style_copies(
          pair.extras["style_maps"][index], size,
          num_rotations=config.num_rotations, num_scales=config.num_scales)
      augment.check_copy_sizes(map_copies, [c.shape[:2] for c in copies])
      for copy in map_copies:
        for layer in config.mrf_layers:
          label_maps[layer].append(
              semantic.layer_map(copy, layer, config.network))
  augment.check_copy_sizes(made, planned)
  sizes = {m.layer: m.bank_size for m in pair.level.mrf}
  targets = {layer: _pad_bank(patches.build_bank(
      maps[layer], patch_size=config.patch_size,
      stride=config.style_stride,
      semantic_maps=label_maps[layer] if with_maps else None), sizes[layer])
             for layer in config.mrf_layers}
  targets.update(_field_targets(pair))
  if with_maps:
    canvas = semantic.level_map(pair.extras["content_map"], pair.level.size)
    targets["synthesis_maps"] = {
        layer: patches.synthesis_map(
            semantic.layer_map(canvas, layer, config.network),
            weight=config.semantic_weight, patch_size=config.patch_size,
            stride=config.synth_stride)
        for layer in config.mrf_layers}
  return targets


def _layer_maps(level, pair: int, layer: str, network: str):
  """(synthesis map size, [each style copy's map size]) at a level."""
  return (vgg.map_size(*level.size, layer, network),
          [vgg.map_size(h, w, layer, network) for h, w in level.copies[pair]])


def _field_targets(pair: PairLevel) -> Dict[str, Any]:
  """The nearest-neighbour field's targets of a level, if it keeps one.

  A PatchMatch level (the plan's `matching`) gets 'patchmatch': {layer:
  {'grid': its copies' `patchmatch_lib.BankGrid` (padded to the batch's
  number of copies), 'radii': the random search radii, int32 [n] (from the
  batch's largest copy, so every pair has the same n)}} and `CARRY`:
  {'fields': {layer: int32 [P]}, 'key': uint32 [2], 'passes': int32, the
  next evaluation's pass count}. The field starts from the previous
  level's (`PairLevel.carried`), upsampled
  (`patchmatch_lib.upsample_field`), or else uniformly at random from
  (--seed, level), as its PRNG key: the same for a pair alone or in a
  batch. An exact level followed by a PatchMatch level (--matching=auto)
  carries its exact matches too, as the next level's start.
  """
  config, level, plan = pair.config, pair.level, pair.plan
  later = [l for l in plan.levels if l.index == level.index + 1]
  patchmatch = level.matching == patches.PATCHMATCH
  if not patchmatch and not (later and
                             later[0].matching == patches.PATCHMATCH):
    return {}
  # Host-side draws (numpy): eager jax.random calls would compile a
  # threefry kernel per shape, a few seconds per level on XLA:CPU.
  rng = np.random.default_rng([config.seed, level.index])
  previous = pair.carried.get(MRF_NAME)
  coarser = [l for l in plan.levels if l.index == level.index - 1]
  fields, search = {}, {}
  for mrf in level.mrf:
    layer = mrf.layer
    synth, copies = _layer_maps(level, pair.pair, layer, config.network)
    real = mrf.bank_sizes[pair.pair]
    coarse = [m for l in coarser for m in l.mrf if m.layer == layer]
    carried = (previous or {}).get("fields", {}).get(layer)
    # A field carried from the level below (not one of another run or
    # another layer list, whose size would differ) is upsampled.
    if (carried is not None and coarse and
        np.shape(carried) == (coarse[0].num_patches,)):
      coarse_synth, coarse_copies = _layer_maps(coarser[0], pair.pair, layer,
                                                config.network)
      field = patchmatch_lib.upsample_field(
          np.asarray(carried), synth_from=coarse_synth,
          synth_to=synth, copies_from=coarse_copies, copies_to=copies,
          patch_size=config.patch_size, synth_stride=config.synth_stride,
          style_stride=config.style_stride)
    else:
      field = rng.integers(0, real, mrf.num_patches, dtype=np.int32)
    fields[layer] = jnp.asarray(field)
    if patchmatch:
      grid = patchmatch_lib.bank_grid(copies, config.patch_size,
                                      config.style_stride)
      num_copies = max(len(c) for c in level.copies)
      # The batch's largest copy sets the radii, so that pairs share n.
      largest = patchmatch_lib.bank_grid(
          [s for p in range(len(level.copies))
           for s in _layer_maps(level, p, layer, config.network)[1]],
          config.patch_size, config.style_stride)
      padded = patchmatch_lib.pad_grid(grid, num_copies, mrf.bank_size)
      search[layer] = {
          "grid": patchmatch_lib.BankGrid(*map(jnp.asarray, padded)),
          "radii": jnp.asarray(patchmatch_lib.search_radii(largest))}
  # The key: uint32 [2] for patchmatch_lib.hash_uniform. passes: the next
  # evaluation's PatchMatch passes, more for the level's first.
  targets = {CARRY: {
      "fields": fields,
      "key": jnp.asarray(rng.integers(0, 2 ** 32, 2, dtype=np.uint32)),
      "passes": jnp.asarray(max(PATCHMATCH_START_PASSES,
                                config.patchmatch_passes), jnp.int32)}}
  if patchmatch:
    targets["patchmatch"] = search
  return targets


# Random search draws per radius and pass (patchmatch_lib.patchmatch's samples).
# On relu3_1 features of example:astronaut against example:coffee at 256
# px, from a random start (benchmarks/bench_patchmatch.py --field_size):
# 2 draws per radius reached in 10 passes the mean NCC that 1 draw reached
# in ~15, for 6 more candidates per pass (25 instead of 19, one copy), and
# candidates of the random search gained more per candidate than more
# propagation jumps did.
PATCHMATCH_SAMPLES = 2
# Uniformly random bank patches and hops to another style copy per pass,
# per synthesis patch.
PATCHMATCH_RANDOM = 1
PATCHMATCH_HOPS = 1
# Random bank patches per pass shared by every synthesis patch, scored as
# one [K, D] x [D, P] product (a random chunk of the exact scan: P x K, not
# P x M). The global exploration that per-patch candidates lack: on the
# relu3_1 features of example:astronaut against 9 copies of example:coffee
# at 256 px (M = 5030), from a random start, 10 passes reached a mean NCC
# of 0.945 of the exact one without them, 0.977 with 64, 0.992 with 256
# and 0.999 with 1024 (the last an exact scan in ~5 passes at this M); 256
# cost no more time per pass than the ~26 gathered candidates. That is for
# one style copy; `patchmatch_shared` scales it with the copies.
PATCHMATCH_SHARED = 256


def patchmatch_shared(num_copies: int) -> int:
  """Shared random candidates per pass (patchmatch_lib.patchmatch's
  num_shared) for a bank of num_copies style copies: PATCHMATCH_SHARED
  times sqrt(num_copies), rounded to a multiple of 64.

  The bank grows about linearly with the copies, so a fixed count explores
  less of it per pass; scaling the count linearly would keep the share but
  make the product ([K, D] x [D, P]) the pass's largest cost. The square
  root, measured at 512 px with 9 copies (benchmarks/bench_patchmatch.py
  --sizes 512 --copies 9 --shared 256 768): the field's lowest mean NCC at
  relu3_1 after a level's first 10 iterations went from 0.987 of the exact
  one to 0.991, for 4.5 % more time per iteration.
  """
  scaled = PATCHMATCH_SHARED * math.sqrt(max(int(num_copies), 1))
  return int(64 * round(scaled / 64))


def _search_kwargs(config, layer_search) -> Dict[str, Any]:
  """patchmatch_lib.patchmatch's search settings for one MRF layer's
  `search` entry ({'grid': BankGrid, 'radii': [n]}), tiled or not."""
  return dict(radii=layer_search["radii"], samples=PATCHMATCH_SAMPLES,
              num_random=PATCHMATCH_RANDOM, num_hops=PATCHMATCH_HOPS,
              num_shared=patchmatch_shared(
                  layer_search["grid"].starts.shape[-1]),
              synth_stride=config.synth_stride,
              style_stride=config.style_stride)


# Passes of a level's first evaluation (its field is random or upsampled
# from the coarser level); later evaluations run --patchmatch_passes.
PATCHMATCH_START_PASSES = 8


def chunk_kwargs(config) -> Dict[str, Any]:
  """How the exact matching runs (patches.match_map), products in
  --dtype; exact, patchmatch and auto scan in patches.scan_method's form
  where they scan."""
  kwargs = {"chunk_size": config.chunk_size} if config.chunk_size else {}
  kwargs.update(matching=patches.scan_method(
                    config.matching, patch_size=config.patch_size,
                    stride=config.synth_stride),
                compute_dtype=None if config.dtype == "float32"
                else config.dtype)
  return kwargs


def _mrf_loss(config, x, features, targets, weights):
  """Eq. 2 summed over the MRF layers (losses.mrf_loss).

  Without a `CARRY` each layer's matching is the exact scan inside
  losses.mrf_loss (as it always was). With one, the matches are made here
  and returned as the next field: by PatchMatch from the carried field
  (targets 'patchmatch'; the carry's pass count: PATCHMATCH_START_PASSES
  at a level's first evaluation, --patchmatch_passes after), or, on an
  exact level before a PatchMatch level, by the exact scan.
  """
  del x
  values, stats = {}, {}
  synthesis_maps = targets.get("synthesis_maps", {})
  carry = targets.get(CARRY)
  search = targets.get("patchmatch")
  kwargs = chunk_kwargs(config)
  if carry is not None:
    # One split per evaluation: [next key, one key per layer].
    keys = patchmatch_lib.split_key(carry["key"], 1 + len(config.mrf_layers))
    fields = {}
  for i, layer in enumerate(config.mrf_layers):
    matches = None
    if carry is not None:
      fmap = jax.lax.stop_gradient(features[layer])
      if search is not None:
        synth = patches.extract_patches(fmap, patch_size=config.patch_size,
                                        stride=config.synth_stride)
        grid = tuple(len(patches.grid_positions(
            side, config.patch_size, config.synth_stride))
                     for side in fmap.shape[:2])
        matches = patchmatch_lib.patchmatch(
            synth, targets[layer], search[layer]["grid"],
            carry["fields"][layer], keys[1 + i],
            synth_grid=grid, num_passes=carry["passes"],
            synth_map=synthesis_maps.get(layer),
            **_search_kwargs(config, search[layer]))
      else:
        matches = patches.match_map(
            fmap, targets[layer], patch_size=config.patch_size,
            stride=config.synth_stride, chunk_size=kwargs.get(
                "chunk_size", patches.DEFAULT_CHUNK_SIZE),
            method=kwargs["matching"], compute_dtype=kwargs["compute_dtype"],
            synth_map=synthesis_maps.get(layer))
      fields[layer] = matches[0]
    value, layer_stats = losses.mrf_loss(
        features[layer], targets[layer], weight=weights[layer],
        patch_size=config.patch_size, stride=config.synth_stride,
        threshold=config.confidence_threshold,
        synth_map=synthesis_maps.get(layer), matches=matches, **kwargs)
    values[layer] = value
    for name, stat in layer_stats.items():
      stats[f"{name}_{layer}"] = stat
  if carry is None:
    return values, stats
  return values, stats, {
      "fields": fields, "key": keys[0],
      "passes": jnp.full_like(carry["passes"], config.patchmatch_passes)}


def _mrf_tile_loss(config, tile, features, banks, weights, state=None):
  """`_mrf_loss`'s share of one tile's core (losses.mrf_loss_tile).

  With semantic maps (banks['synthesis_maps'], {layer: SynthesisMap} of the
  whole grid, [P, Dm] rows in row-major grid order), each of the tile's
  grid patches is matched with the content map's patch at its own grid
  position, so the tiles' matches are the whole image's.

  With a `CARRY` (PatchMatch, or an exact level handing its matches to a
  PatchMatch level) state is `_mrf_tile_state`'s {'fields': {layer: [P]
  int32}, 'scores': {layer: [P]}} over the whole grid: the tile improves
  its patches' field by PatchMatch (or matches them exactly) and writes
  back the patches it owns (corner in its core). A patch it does not own
  has its corner above or left of the core, so its owner came earlier in
  the tiles' row-major order and wrote its match this evaluation: the tile
  folds that match, not its own, so every patch has one match wherever it
  is folded and the field is the one the loss used. Returns (values,
  partial, state) then.
  """
  synthesis_maps = banks.get("synthesis_maps") or {}
  search = banks.get("patchmatch")
  carry = banks.get(CARRY) if state is not None else None
  kwargs = chunk_kwargs(config)
  del kwargs["matching"]  # a tile's patches are extracted; matmul scores
  values, partial = {}, {}
  if carry is not None:
    # The same split as untiled, per tile a key of its own.
    keys = patchmatch_lib.split_key(carry["key"], 1 + len(config.mrf_layers))
    state = {"fields": dict(state["fields"]), "scores": dict(state["scores"])}
  for i, layer in enumerate(config.mrf_layers):
    bank = banks[layer]
    view = tile.layer(layer, config.network)
    num_rows, num_cols = tile.tiling.grid
    axes = ((view.map_size[0], num_rows), (view.map_size[1], num_cols))
    row_tables, col_tables = (tiling_lib.grid_tables(
        side, count, view.core, view.halo, config.patch_size,
        config.synth_stride) for side, count in axes)
    rows, row_valid, row_owned = (jnp.asarray(t)[view.index[0]]
                                  for t in row_tables)
    cols, col_valid, col_owned = (jnp.asarray(t)[view.index[1]]
                                  for t in col_tables)
    owned = (row_owned[:, None] & col_owned[None, :]).reshape(-1)
    tile_map, index = None, None
    if layer in synthesis_maps or carry is not None:
      row_index, col_index = (jnp.asarray(tiling_lib.grid_index_tables(
          side, count, view.core, view.halo, config.patch_size,
          config.synth_stride))[i] for (side, count), i in zip(axes,
                                                                view.index))
      grid_cols = len(patches.grid_positions(
          view.map_size[1], config.patch_size, config.synth_stride))
      # [R * Cc] rows of the whole grid's [P, ...] per-patch arrays, in the
      # row-major order extract_at gives the tile's patches.
      index = (row_index[:, None] * grid_cols + col_index[None, :]).reshape(-1)
    if layer in synthesis_maps:
      whole = synthesis_maps[layer]
      tile_map = patches.SynthesisMap(
          patches=jnp.take(whole.patches, index, axis=0),
          labels=jnp.take(whole.labels, index))
    matches = None
    if carry is not None:
      synth = patches.extract_at(jax.lax.stop_gradient(features[layer]),
                                 rows, cols, patch_size=config.patch_size)
      field = state["fields"][layer]
      if search is not None:
        tile_number = view.index[0] * num_cols + view.index[1]
        found = patchmatch_lib.patchmatch(
            synth, bank, search[layer]["grid"], jnp.take(field, index),
            patchmatch_lib.fold_key(keys[1 + i], tile_number),
            synth_grid=(rows.shape[0], cols.shape[0]),
            num_passes=carry["passes"], synth_map=tile_map,
            **_search_kwargs(config, search[layer]))
      else:
        found = patches.match(synth, bank, synth_map=tile_map, **kwargs)
      # Owned patches take this tile's match; the others their owner's.
      matches = (jnp.where(owned, found[0], jnp.take(field, index)),
                 jnp.where(owned, found[1],
                           jnp.take(state["scores"][layer], index)))
      # Not owned (and the padding): an index past the end, dropped.
      target = jnp.where(owned, index, field.shape[0])
      state["fields"][layer] = field.at[target].set(found[0], mode="drop")
      state["scores"][layer] = state["scores"][layer].at[target].set(
          found[1], mode="drop")
    value, partial[layer] = losses.mrf_loss_tile(
        features[layer], bank, weight=weights[layer], rows=rows, cols=cols,
        patch_mask=(row_valid[:, None] & col_valid[None, :]).reshape(-1),
        owned=owned, core=(view.halo, view.halo, view.core, view.core),
        patch_size=config.patch_size,
        threshold=config.confidence_threshold, synth_map=tile_map,
        matches=matches, **kwargs)
    values[layer] = value
  if carry is None:
    return values, partial
  return values, partial, state


def _mrf_tile_state(config, carry):
  """The first tile's state: the carried field and its patches' scores
  (written by each patch's owner before any other tile reads them)."""
  del config
  return {"fields": carry["fields"],
          "scores": {layer: jnp.zeros(field.shape, jnp.float32)
                     for layer, field in carry["fields"].items()}}


def _mrf_tile_carry(config, carry, state):
  """The next evaluation's carry from the last tile's state, as
  `_mrf_loss` makes it untiled."""
  keys = patchmatch_lib.split_key(carry["key"], 1 + len(config.mrf_layers))
  return {"fields": state["fields"], "key": keys[0],
          "passes": jnp.full_like(carry["passes"], config.patchmatch_passes)}


def _mrf_tile_stats(config, partial):
  """`_mrf_loss`'s stats (label_agreement too, with maps) from the tiles'
  summed partial statistics."""
  del config
  stats = {}
  for layer, layer_partial in partial.items():
    for name, stat in losses.mrf_tile_stats(layer_partial).items():
      stats[f"{name}_{layer}"] = stat
  return stats


MRF = register(Term(
    name=MRF_NAME, active=_mrf_active, layers=lambda c: c.mrf_layers,
    weights=_mrf_weights, build=_mrf_build, loss=_mrf_loss,
    tile_loss=_mrf_tile_loss, tile_stats=_mrf_tile_stats,
    tile_state=_mrf_tile_state, tile_carry=_mrf_tile_carry))


# ----------------------------------------------------------------------------
# The content term (Eq. 4).


def _content_active(config):
  return config.mode in ("transfer", "gatys") and config.content_weight > 0


def _content_build(pair: PairLevel):
  features = pair.features(np.asarray(pair.content))
  return {layer: features[layer] for layer in pair.config.content_layers}


def _content_loss(config, x, features, targets, weight):
  del config, x
  return {layer: losses.content_loss(features[layer], target, weight=weight)
          for layer, target in targets.items()}, {}


def _content_tile_loss(config, tile, features, targets, weight):
  """The core's share of weight * mean((F - T)^2): its squared error over
  the whole map's number of values."""
  values = {}
  for layer, target in targets.items():
    view = tile.layer(layer, config.network)
    halo, core = view.halo, view.core
    mine = features[layer][halo:halo + core, halo:halo + core]
    error = jnp.where(tiling_lib.core_inside(view),
                      mine - tiling_lib.core_slice(target, view), 0)
    values[layer] = weight * jnp.sum(jnp.square(error)) / target.size
  return values, {}


CONTENT = register(Term(
    name="content", active=_content_active,
    layers=lambda c: c.content_layers,
    weights=lambda c: _scalar(c.content_weight), build=_content_build,
    loss=_content_loss, tile_loss=_content_tile_loss,
    tile_stats=lambda config, partial: {}))


# ----------------------------------------------------------------------------
# The Gram style term of Gatys et al. (the baseline).


def _gram_build(pair: PairLevel):
  config = pair.config
  grams = collections.defaultdict(list)
  for style, size in zip(pair.styles, pair.level.styles[pair.pair]):
    resized = np.asarray(image_io.resize(style, *size, method="torch"))
    style_features = pair.features(resized)
    for layer in config.style_layers:
      grams[layer].append(losses.gram_matrix(style_features[layer]))
  blend = config.blend_weights()
  return {layer: losses.blend_grams(grams[layer], blend)
          for layer in config.style_layers}


def _gram_loss(config, x, features, targets, weight):
  del config, x
  return {layer: losses.gram_loss(features[layer], target, weight=weight)
          for layer, target in targets.items()}, {}


GRAM = register(Term(
    name="gram", active=lambda c: c.mode == "gatys",
    layers=lambda c: c.style_layers,
    # neural-style applies style_weight to every layer as it is.
    weights=lambda c: _scalar(c.style_weight),
    build=_gram_build, loss=_gram_loss))


# ----------------------------------------------------------------------------
# The smoothness prior (Eq. 5).


def _tv_loss(config, x, features, targets, weight):
  del config, features, targets
  return {"": losses.tv_loss(x, weight=weight)}, {}


TV = register(Term(
    name="tv", active=lambda c: c.tv_weight > 0, layers=lambda c: (),
    weights=lambda c: _scalar(c.tv_weight), build=lambda pair: {},
    loss=_tv_loss))


# ----------------------------------------------------------------------------
# The temporal term of video style transfer (Ruder, Dosovitskiy & Brox 2016,
# Eq. 7-8): frame t kept close to the previous results warped into it.

TEMPORAL_EXTRA = "temporal"


def _temporal_build(pair: PairLevel):
  """{'warped': [K, h, w, 3], 'weights': [K, h, w]} at the level's size.

  pair.extras['temporal'] holds the full-size targets the video driver
  made: 'warped', the previous results t-j warped into frame t [K, H, W, 3]
  in the preprocessed space, and 'weights', their long-term consistency
  weights [K, H, W] (`flow.temporal_inputs`).
  """
  extra = pair.extras.get(TEMPORAL_EXTRA)
  if extra is None:
    raise config_lib.ConfigError(
        "--temporal_weight: the temporal term needs the previous frames of "
        "a video (python -m cnnmrf_jax.video); image runs take 0")
  warped, weights = jnp.asarray(extra["warped"]), jnp.asarray(extra["weights"])
  height, width = pair.level.size
  if warped.shape[1:3] != (height, width):
    warped, weights = temporal.targets_at_size(warped, weights, height, width)
  return {"warped": warped.astype(jnp.float32),
          "weights": weights.astype(jnp.float32)}


def _temporal_loss(config, x, features, targets, weight):
  del config, features
  return {"": temporal.temporal_loss(x, targets["warped"], targets["weights"],
                                     weight=weight)}, {}


TEMPORAL = register(Term(
    name="temporal", active=lambda c: c.temporal_weight > 0,
    layers=lambda c: (), weights=lambda c: _scalar(c.temporal_weight),
    build=_temporal_build, loss=_temporal_loss))
