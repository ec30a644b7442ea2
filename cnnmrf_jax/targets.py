"""A pyramid level's targets, built on the host once per level.

For every pair of a batch and every active term (terms.py), the term's
targets at the level: the content features, the style patch banks of every
augmented copy, the Gram matrices, ... each from the inputs resized to the
sizes the plan gives. They are stacked on a leading batch axis N, beside
every pair's loss weights, into the `targets` argument of the objective.
Also the starting image of the coarsest level.
"""

import dataclasses
from typing import Any, Callable, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cnnmrf_jax import config as config_lib
from cnnmrf_jax import image_io
from cnnmrf_jax import terms as terms_lib
from cnnmrf_jax import vgg


@dataclasses.dataclass
class Inputs:
  """The images of a batch of N pairs, RGB float32 in [0, 1].

  contents: N arrays [H_c, W_c, 3] (None in texture mode).
  styles: N lists of style images [H_s, W_s, 3] (one or more per pair).
  init_images: N arrays or None, for --init=PATH.
  configs: None, or N per-pair configs (a sweep batching its points): they
    may differ from the run's config in `batch.PER_PAIR_FIELDS` only
    (images, init, seed, loss weights), and each pair then starts from the
    noise a single run of its own config would draw.
  extras: None, or N dicts of per-pair inputs of terms beyond the images
    (`terms.PairLevel.extras`); semantic maps are 'content_map' and
    'style_maps' there (`semantic.load`).
  """
  contents: List[Optional[np.ndarray]]
  styles: List[List[np.ndarray]]
  init_images: List[Optional[np.ndarray]]
  configs: Optional[List[config_lib.Config]] = None
  extras: Optional[List[Dict[str, Any]]] = None

  def pair_config(self, config: config_lib.Config, n: int
                  ) -> config_lib.Config:
    """The config of pair n: its own in a sweep's batch, else `config`."""
    return self.configs[n] if self.configs else config

  def sizes(self):
    """Every pair's `plan.InputSizes`."""
    from cnnmrf_jax import plan  # pylint: disable=g-import-not-at-top
    shape = lambda a: None if a is None else tuple(a.shape[:2])
    extras = self.extras or [{}] * len(self.styles)
    # Doodle mode: no content image; the content map is the canvas.
    labels = lambda e: (0 if e.get("content_map") is None
                        else int(e["content_map"].shape[-1]))
    return [plan.InputSizes(shape(c if c is not None
                                  else e.get("content_map")),
                            tuple(shape(s) for s in styles), shape(i),
                            num_labels=labels(e))
            for c, styles, i, e in zip(self.contents, self.styles,
                                       self.init_images, extras)]


def level_targets(config: config_lib.Config, run_plan: Any, level: Any,
                  inputs: Inputs,
                  features: Callable[[np.ndarray], Dict[str, jnp.ndarray]],
                  carried: Optional[Dict[str, Any]] = None
                  ) -> Dict[str, Any]:
  """Targets of every pair at one level, stacked on a leading N axis.

  Returns {term name: [N, ...] targets, 'weights': {term name: [N] ...}}
  for the terms active in `config`. features: rgb [H, W, 3] -> {layer:
  [h, w, c]}, the VGG on one image. carried: None, or {term name: [N, ...]
  pytree}, the terms' carried state at the end of the previous level (the
  objective's aux['carry']); each pair's build sees its own
  (`terms.PairLevel.carried`).
  """
  active = terms_lib.active_terms(config)
  carried = jax.device_get(carried or {})
  per_pair = []
  for n in range(len(inputs.styles)):
    pair_config = inputs.pair_config(config, n)
    content = None
    if inputs.contents[n] is not None:
      content = image_io.resize(inputs.contents[n], *level.size,
                                method="torch")
    pair = terms_lib.PairLevel(
        # Pairs past the plan's are padding, copies of its last pair.
        config=pair_config, level=level,
        pair=min(n, run_plan.num_pairs - 1), content=content,
        styles=inputs.styles[n],
        extras=inputs.extras[n] if inputs.extras else {},
        features=features, plan=run_plan,
        carried=jax.tree.map(lambda a, n=n: np.asarray(a[n]), carried))
    targets = {"weights": terms_lib.loss_weights(pair_config)}
    for term in active:
      targets[term.name] = term.build(pair)
    per_pair.append(targets)
  return jax.tree.map(lambda *a: jnp.stack(a), *per_pair)


def initial_images(config: config_lib.Config, inputs: Inputs, size,
                   convention: str) -> jnp.ndarray:
  """[N, H, W, 3] starting point of the coarsest level, preprocessed:
  noise N(0, init_noise_std^2), the content image or the --init image."""
  images = []
  for n in range(len(inputs.styles)):
    pair_config = inputs.pair_config(config, n)
    init = pair_config.resolved_init
    if init == "noise":
      # Pairs of one run draw different noise; a sweep's pairs (own
      # configs) draw what each would draw alone (index 0).
      index = 0 if inputs.configs else n
      key = jax.random.fold_in(jax.random.key(pair_config.seed), index)
      images.append(pair_config.init_noise_std * jax.random.normal(
          key, tuple(size) + (3,), jnp.float32))
      continue
    source = (inputs.contents[n] if init == "content"
              else inputs.init_images[n])
    rgb = image_io.resize(source, *size, method="torch")
    images.append(vgg.preprocess(jnp.asarray(rgb, jnp.float32), convention))
  return jnp.stack(images)
