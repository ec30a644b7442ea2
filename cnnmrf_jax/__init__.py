"""cnnmrf_jax: CNNMRF image synthesis (Li & Wand, CVPR 2016) in JAX and Flax.

Modules:
  vgg         Flax VGG19/VGG16 returning named features; pre/deprocessing.
  weights     Fetch, convert, cache and strictly load VGG weights.
  patches     Neural patch extraction, style augmentation, NCC matching.
  losses      MRF, content, total-variation and Gram losses.
  image_io    Reading, writing and resizing images; pyramid sizes.
  optim       The only module that imports jaxopt/optax.
  synthesize  The coarse-to-fine synthesis driver.
  main        Command line (absl flags).
"""

__version__ = "0.1.0"
