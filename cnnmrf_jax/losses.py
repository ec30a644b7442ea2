"""Loss terms of CNNMRF (Li & Wand, CVPR 2016) and the Gatys baseline.

Pure, jit-able functions of one example (features [H, W, C], image
[H, W, 3]); a driver vmaps them over a batch axis. Each returns a scalar in
the features' dtype (`mrf_loss` also returns match statistics). The
objective of CNNMRF (Eq. 1) is

    E_s(Phi(x), Phi(x_s)) + a1 * E_c(Phi(x), Phi(x_c)) + a2 * Y(x),

with E_s the MRF term (Eq. 2, `mrf_loss`), E_c the content term (Eq. 4,
`content_loss`) and Y the squared-gradient smoothness prior (Eq. 5,
`tv_loss`). `gram_matrix`, `blend_grams` and `gram_loss` are the style term of
Gatys et al. (CVPR 2016), the baseline mode.
"""

from typing import Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from cnnmrf_jax import patches as patches_lib


def _check_rank3(x, name: str, what: str = "[H, W, C]") -> None:
  if x.ndim != 3:
    raise ValueError(f"{name} must be a single {what} array (vmap over "
                     f"batches), got shape {x.shape}")


def mrf_loss(features: jnp.ndarray, bank: patches_lib.PatchBank, *,
             weight: float, patch_size: int = 3, stride: int = 2,
             threshold: float = 0.0,
             chunk_size: int = patches_lib.DEFAULT_CHUNK_SIZE,
             matching: str = "matmul", compute_dtype=None,
             synth_map: Optional[patches_lib.SynthesisMap] = None,
             matches: Optional[Tuple[jnp.ndarray, jnp.ndarray]] = None
             ) -> Tuple[jnp.ndarray, Dict[str, jnp.ndarray]]:
  """MRF style loss of one layer (Eq. 2), as the reference applies it.

  Synthesis patches are taken on the stride-plus-tail grid of `features`
  and matched to the bank by NCC (Eq. 3, `patches.match`; no gradient flows
  through the matching). Matches with score >= threshold are kept (all-zero
  patches never are); their style patches are folded back into an
  overlap-averaged target Tbar on the positions they cover. Then

    loss = weight / 2 * sum over covered positions of (F - Tbar)^2,

  Tbar held constant, so dloss/dF = weight * (F - Tbar) on covered positions
  and 0 elsewhere: exactly the gradient the reference code injects (it adds
  t_NN(i) - p_i over each patch window and divides by the coverage count;
  it never computes a loss value).

  Args:
    features: [H, W, C] synthesis features Phi_l(x).
    bank: PatchBank of the style's features at the same layer, built with
      the same patch_size (D = patch_size^2 * C).
    weight: the layer's MRF weight (1e-4 per layer on the Caffe scale).
    threshold: minimum NCC for a match to count.
    chunk_size, matching, compute_dtype: how the matching runs
      (`patches.match_map`: bank patches per step, 'matmul' or 'conv', the
      dtype of the score products); not what it computes.
    synth_map: None, or the synthesis side's semantic map patches
      (`patches.SynthesisMap`; the bank then carries the style's): they
      steer which style patch is chosen (Champandard 2016) and nothing else:
      the loss and its gradient are the same function of the chosen
      patches, on the features alone.
    matches: None (match here by the exact scan), or the synthesis
      patches' (indices [P] int32, scores [P]) as `patches.match` returns
      them, made elsewhere (PatchMatch's carried field): the loss is then
      the same function of those matches.

  Returns:
    (loss, stats); stats holds scalars 'mean_ncc' (mean feature NCC of the
    kept matches, 0 when none), 'num_matched' (kept matches, int32) and
    'num_distinct' (distinct bank patches among them, int32); with
    synth_map also 'label_agreement': the share of kept matches whose style
    patch's label equals the synthesis patch's (0 when none).
  """
  _check_rank3(features, "mrf_loss: features")
  height, width, channels = features.shape
  d = patch_size * patch_size * channels
  if bank.patches.ndim != 2 or bank.patches.shape[1] != d:
    raise ValueError(
        f"mrf_loss: the bank's patches must be [M, {d}] for patch_size="
        f"{patch_size} and C={channels}, got {bank.patches.shape} (bank "
        f"built from another layer or patch size?)")
  fold_kw = dict(height=height, width=width, channels=channels,
                 patch_size=patch_size, stride=stride)

  if matches is None:
    indices, scores = patches_lib.match_map(
        lax.stop_gradient(features), bank, patch_size=patch_size,
        stride=stride, chunk_size=chunk_size, method=matching,
        compute_dtype=compute_dtype, synth_map=synth_map)
  else:
    indices, scores = (lax.stop_gradient(m) for m in matches)
  keep = (scores >= threshold) & (scores > -jnp.inf)
  targets = jnp.take(bank.patches, indices, axis=0).astype(features.dtype)
  summed, count = patches_lib.fold(targets, mask=keep, **fold_kw)
  covered = count > 0
  tbar = lax.stop_gradient(
      jnp.where(covered, summed / jnp.where(covered, count, 1), 0))
  residual = jnp.where(covered, features - tbar, 0)
  loss = 0.5 * weight * jnp.sum(jnp.square(residual))

  num_matched = jnp.sum(keep, dtype=jnp.int32)
  used = jnp.zeros(bank.patches.shape[:1], jnp.int32).at[indices].max(
      keep.astype(jnp.int32))
  stats = {
      "mean_ncc": jnp.sum(jnp.where(keep, scores, 0)) /
                  jnp.maximum(num_matched, 1).astype(scores.dtype),
      "num_matched": num_matched,
      "num_distinct": jnp.sum(used, dtype=jnp.int32),
  }
  if synth_map is not None:
    agree = keep & (jnp.take(bank.labels, indices) == synth_map.labels)
    stats["label_agreement"] = (
        jnp.sum(agree, dtype=jnp.float32) /
        jnp.maximum(num_matched, 1).astype(jnp.float32))
  return loss, stats


def mrf_target_tile(features: jnp.ndarray, bank: patches_lib.PatchBank, *,
                    rows: jnp.ndarray, cols: jnp.ndarray,
                    patch_mask: jnp.ndarray, patch_size: int = 3,
                    threshold: float = 0.0,
                    chunk_size: int = patches_lib.DEFAULT_CHUNK_SIZE,
                    compute_dtype=None,
                    synth_map: Optional[patches_lib.SynthesisMap] = None,
                    matches: Optional[Tuple[jnp.ndarray, jnp.ndarray]] = None):
  """`mrf_loss`'s matching and folding for a tile of the whole map.

  features [h, w, C] is a crop of the whole map; rows [R], cols [Cc] are
  the crop-local corners of the whole map's grid patches that overlap the
  tile's core (padded to a static count, patch_mask [R * Cc] False on the
  padding). Every patch covering a core position is among them, so on the
  core the folded sum and count, hence Tbar, are the whole map's.
  synth_map: None, or the semantic map patches of exactly these R * Cc
  patches (the whole grid's `patches.SynthesisMap` rows at the same grid
  positions, `tiling.grid_index_tables`): each patch is then scored as in
  the whole map's matching, so its match is the whole map's.

  Returns (tbar [h, w, C], covered [h, w, 1] bool, indices [R * Cc],
  scores [R * Cc], keep [R * Cc]); tbar is exact on the core only.
  """
  height, width, _ = features.shape
  if matches is None:
    synth = patches_lib.extract_at(lax.stop_gradient(features), rows, cols,
                                   patch_size=patch_size)
    indices, scores = patches_lib.match(synth, bank, chunk_size=chunk_size,
                                        compute_dtype=compute_dtype,
                                        synth_map=synth_map)
  else:
    indices, scores = (lax.stop_gradient(m) for m in matches)
  keep = patch_mask & (scores >= threshold) & (scores > -jnp.inf)
  targets = jnp.take(bank.patches, indices, axis=0).astype(features.dtype)
  summed, count = patches_lib.fold_at(targets, rows, cols, height=height,
                                      width=width, patch_size=patch_size,
                                      mask=keep)
  covered = count > 0
  tbar = lax.stop_gradient(
      jnp.where(covered, summed / jnp.where(covered, count, 1), 0))
  return tbar, covered, indices, scores, keep


def mrf_loss_tile(features: jnp.ndarray, bank: patches_lib.PatchBank, *,
                  weight: float, rows: jnp.ndarray, cols: jnp.ndarray,
                  patch_mask: jnp.ndarray, owned: jnp.ndarray,
                  core: Tuple[int, int, int, int], patch_size: int = 3,
                  threshold: float = 0.0,
                  chunk_size: int = patches_lib.DEFAULT_CHUNK_SIZE,
                  compute_dtype=None,
                  synth_map: Optional[patches_lib.SynthesisMap] = None,
                  matches: Optional[Tuple[jnp.ndarray, jnp.ndarray]] = None
                  ) -> Tuple[jnp.ndarray, Dict[str, jnp.ndarray]]:
  """The share of `mrf_loss` of one tile's core (see `mrf_target_tile`;
  synth_map: the tile's patches' semantic map part, matches: their matches
  made elsewhere, as there).

  core: (top, left, height, width) of the core in the crop's map (static).
  owned [R * Cc]: the patches whose corner lies in the core, so that each
  patch's statistics are counted by exactly one tile. The losses of all
  cores sum to `mrf_loss`; their gradients to its gradient.

  Returns (loss, partial stats): 'num_matched' and 'ncc_sum' over owned
  kept matches, 'used' [M] int32 (1 where an owned kept match took that
  bank patch), with synth_map also 'num_agree' (owned kept matches whose
  style label is the synthesis patch's, int32); sums of them over tiles
  give `mrf_loss`'s statistics (`mrf_tile_stats`).
  """
  _check_rank3(features, "mrf_loss_tile: features")
  tbar, covered, indices, scores, keep = mrf_target_tile(
      features, bank, rows=rows, cols=cols, patch_mask=patch_mask,
      patch_size=patch_size, threshold=threshold, chunk_size=chunk_size,
      compute_dtype=compute_dtype, synth_map=synth_map, matches=matches)
  top, left, height, width = core
  window = (slice(top, top + height), slice(left, left + width))
  residual = jnp.where(covered[window], features[window] - tbar[window], 0)
  loss = 0.5 * weight * jnp.sum(jnp.square(residual))
  counted = keep & owned
  partial = {
      "num_matched": jnp.sum(counted, dtype=jnp.int32),
      "ncc_sum": jnp.sum(jnp.where(counted, scores, 0)),
      "used": jnp.zeros(bank.patches.shape[:1], jnp.int32).at[indices].max(
          counted.astype(jnp.int32)),
  }
  if synth_map is not None:
    partial["num_agree"] = jnp.sum(
        counted & (jnp.take(bank.labels, indices) == synth_map.labels),
        dtype=jnp.int32)
  return loss, partial


def mrf_tile_stats(partial: Dict[str, jnp.ndarray]) -> Dict[str, jnp.ndarray]:
  """`mrf_loss`'s statistics from the sums over tiles of `mrf_loss_tile`'s
  partial statistics."""
  num_matched = partial["num_matched"]
  stats = {
      "mean_ncc": partial["ncc_sum"] /
                  jnp.maximum(num_matched, 1).astype(partial["ncc_sum"].dtype),
      "num_matched": num_matched,
      "num_distinct": jnp.sum(partial["used"] > 0, dtype=jnp.int32),
  }
  if "num_agree" in partial:  # semantic maps: as `mrf_loss` computes it
    stats["label_agreement"] = (
        partial["num_agree"].astype(jnp.float32) /
        jnp.maximum(num_matched, 1).astype(jnp.float32))
  return stats


def content_loss(features: jnp.ndarray, target: jnp.ndarray, *,
                 weight: float) -> jnp.ndarray:
  """E_c (Eq. 4) = weight * mean((F - T)^2); F, T [H, W, C].

  The reference's form (w_c = 20 on the Caffe activation scale); the mean,
  not the sum, keeps the weight independent of the image size.
  """
  _check_rank3(features, "content_loss: features")
  if target.shape != features.shape:
    raise ValueError(f"content_loss: target shape {target.shape} does not "
                     f"match features shape {features.shape}")
  return weight * jnp.mean(jnp.square(features - target))


def tv_loss(image: jnp.ndarray, *, weight: float) -> jnp.ndarray:
  """Y(x) (Eq. 5), the reference's exact form; image [H, W, C], H, W >= 2.

  weight / 2 * sum over i < H-1, j < W-1 of
  (x[i, j+1] - x[i, j])^2 + (x[i+1, j] - x[i, j])^2: both differences are
  taken on the same top-left [H-1, W-1] block, so the last row's horizontal
  and the last column's vertical differences are left out, as there.
  """
  _check_rank3(image, "tv_loss: image", "[H, W, 3]")
  if image.shape[0] < 2 or image.shape[1] < 2:
    raise ValueError(f"tv_loss: image must be at least 2 x 2, got shape "
                     f"{image.shape}")
  corner = image[:-1, :-1]
  dx = image[:-1, 1:] - corner
  dy = image[1:, :-1] - corner
  return 0.5 * weight * (jnp.sum(jnp.square(dx)) + jnp.sum(jnp.square(dy)))


def gram_matrix(features: jnp.ndarray) -> jnp.ndarray:
  """G = F^T F / (C H W): features [H, W, C] -> [C, C].

  neural-style's (jcjohnson/neural-style) GramMatrix divided by the number
  of elements of the map, so that Gram matrices of style images of
  different sizes compare and blend, and its style weights mean what its
  users know.
  """
  _check_rank3(features, "gram_matrix: features")
  flat = features.reshape(-1, features.shape[-1])
  return jnp.dot(flat.T, flat) / flat.size


def blend_grams(grams: Sequence[jnp.ndarray],
                weights: Sequence[float]) -> jnp.ndarray:
  """sum_k w_k G_k / sum_k w_k: [C, C] Gram matrices of several styles."""
  if not len(grams):
    raise ValueError("blend_grams needs at least one Gram matrix")
  if len(weights) != len(grams):
    raise ValueError(f"blend_grams: {len(grams)} Gram matrices but "
                     f"{len(weights)} weights")
  shape = grams[0].shape
  for i, g in enumerate(grams):
    if g.ndim != 2 or g.shape[0] != g.shape[1] or g.shape != shape:
      raise ValueError(f"blend_grams: grams[{i}] has shape {g.shape}; all "
                       f"must be the same square [C, C] (first: {shape})")
  w = np.asarray(weights, np.float64)
  if np.any(w < 0) or not w.sum() > 0:
    raise ValueError(f"blend_grams: weights must be non-negative with a "
                     f"positive sum, got {list(weights)}")
  w = w / w.sum()
  return sum(float(wk) * g for wk, g in zip(w, grams))


def gram_loss(features: jnp.ndarray, target_gram: jnp.ndarray, *,
              weight: float) -> jnp.ndarray:
  """One layer's style loss as neural-style defines it:
  weight * mean over the C^2 entries of (G - A)^2.

  features [H, W, C], target_gram [C, C] from `gram_matrix` /
  `blend_grams`, G = gram_matrix(features). The weight is applied to every
  style layer as it is (not divided by their number), as there.

  From Gatys et al. (CVPR 2016, Eq. 4-5), E_l = 1 / (4 N^2 M^2) ||G' - A'||^2
  with the unnormalised G' = F^T F, N = C channels, M = H W positions: here
  G = G' / (N M), so mean((G - A)^2) = ||G' - A'||^2 / (N^4 M^2) = 4 E_l / N^2,
  and this loss is weight * 4 / N^2 * E_l (a style of another size than the
  synthesis is compared by its normalised A).
  """
  _check_rank3(features, "gram_loss: features")
  channels = features.shape[-1]
  if target_gram.shape != (channels, channels):
    raise ValueError(f"gram_loss: target_gram must be [{channels}, "
                     f"{channels}] for features with C={channels}, got "
                     f"{target_gram.shape}")
  flat = features.reshape(-1, channels)
  return weight * _gram_error(flat, target_gram.astype(flat.dtype))


@jax.custom_jvp
def _gram_error(flat: jnp.ndarray, target_gram: jnp.ndarray) -> jnp.ndarray:
  """mean((F^T F / n - A)^2): flat F [M, C], n = M C, A [C, C]."""
  return jnp.mean(jnp.square(_gram_of_flat(flat) - target_gram))


def _gram_of_flat(flat: jnp.ndarray) -> jnp.ndarray:
  """F^T F / n of flat [M, C] as one dot contracting the positions."""
  return lax.dot_general(flat, flat, (((0,), (0,)), ((), ()))) / flat.size


@_gram_error.defjvp
def _gram_error_jvp(primals, tangents):
  # With D = G - A and G = F^T F / n, d mean(D^2) = 2 / C^2 sum(D * dG)
  # - ..., and sum(D * (dF^T F + F^T dF)) / n = 2 / n sum((F S) * dF) with
  # S = (D + D^T) / 2: one [M, C] x [C, C] product, F S, serves the
  # tangent and (transposed) the gradient. Autodiff through F^T F instead
  # makes two such products in the backward pass (F dG^T and F dG), and
  # at relu1_1 of a 256 px image each reads the whole [65536, 64] map.
  flat, target_gram = primals
  flat_dot, target_dot = tangents
  channels = flat.shape[1]
  diff = _gram_of_flat(flat) - target_gram  # [C, C]
  pulled = jnp.dot(flat, (diff + diff.T) / 2)  # [M, C]
  scale = 2.0 / (channels * channels)
  tangent = scale * (2.0 / flat.size * jnp.sum(pulled * flat_dot) -
                     jnp.sum(diff * target_dot))
  return jnp.mean(jnp.square(diff)), tangent
