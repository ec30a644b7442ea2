"""The matching's extra cost with semantic maps: seconds per L-BFGS iteration
with and without maps, at the finest level of a transfer.

The transfer settings are the defaults (relu3_1 and relu4_1 MRF, relu4_2
content, 1 style copy unless --num_rotations/--num_scales), example:astronaut
onto example:coffee at --size px; the maps are two labels (left/right halves
of the style, top/bottom of the content), so every iteration scores the map
part of every bank patch. Both variants run through the same compiled
Synthesizer (one program per target structure) and are timed round-robin,
--rounds rounds of --iters chained iterations each, after compilation;
printed are the medians and their ratio. Random VGG19 weights (the time
depends on the shapes only).

    python benchmarks/bench_semantic.py --size=384
"""

import argparse
import statistics
import time

import jax
import numpy as np

from cnnmrf_jax import config as config_lib
from cnnmrf_jax import plan as plan_lib
from cnnmrf_jax import semantic
from cnnmrf_jax import synthesize
from cnnmrf_jax import targets as targets_lib
from cnnmrf_jax import vgg


def _halves(height, width, vertical):
  rows, cols = np.mgrid[:height, :width]
  split = (cols >= width // 2) if vertical else (rows >= height // 2)
  colours = np.asarray([(255, 0, 0), (0, 0, 255)], np.uint8)
  return colours[split.astype(int)]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=384)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--num_rotations", type=int, default=0)
  parser.add_argument("--num_scales", type=int, default=0)
  args = parser.parse_args()
  config = config_lib.Config(
      content_image="example:astronaut", style_image=("example:coffee",),
      max_size=args.size, num_res=1, num_iter=(args.iters,),
      num_rotations=args.num_rotations, num_scales=args.num_scales)
  plain = synthesize.load_inputs(config)
  content, style = plain.contents[0], plain.styles[0][0]
  onehots, _, _ = semantic.to_labels(
      [_halves(*content.shape[:2], False), _halves(*style.shape[:2], True)],
      ["content_map", "style_map"])
  mapped = targets_lib.Inputs(
      contents=plain.contents, styles=plain.styles,
      init_images=plain.init_images,
      extras=[{"content_map": onehots[0], "style_maps": onehots[1:]}])
  run_plan = plan_lib.make(config, plain.sizes())
  level = run_plan.levels[-1]
  synthesizer = synthesize.Synthesizer(config, vgg.init_params("vgg19"),
                                       "caffe")
  variants = {}
  for name, inputs in (("without maps", plain), ("with maps", mapped)):
    targets = targets_lib.level_targets(config, run_plan, level, inputs,
                                        synthesizer.features)
    x = targets_lib.initial_images(config, inputs, level.size, "caffe")
    state = synthesizer.init(x, targets)
    x, state = synthesizer.update(x, state, targets)  # compile
    jax.block_until_ready(x)
    variants[name] = [targets, x, state]
  times = {name: [] for name in variants}
  for _ in range(args.rounds):
    for name, variant in variants.items():
      targets, x, state = variant
      start = time.perf_counter()
      for _ in range(args.iters):
        x, state = synthesizer.update(x, state, targets)
      jax.block_until_ready(x)
      times[name].append((time.perf_counter() - start) / args.iters)
      variant[1:] = [x, state]
  mrf = ", ".join(f"{m.layer} {m.num_patches} x {m.bank_size}"
                  for m in level.mrf)
  print(f"transfer at {level.size[0]}x{level.size[1]} px, "
        f"{len(level.copies[0])} style cop(ies), patches x bank: {mrf}")
  medians = {name: statistics.median(t) for name, t in times.items()}
  for name, median in medians.items():
    print(f"  {name:13s} {median:.3f} s/iter (rounds: "
          f"{', '.join(f'{t:.3f}' for t in times[name])})")
  print(f"  ratio with/without: "
        f"{medians['with maps'] / medians['without maps']:.3f}")


if __name__ == "__main__":
  main()
