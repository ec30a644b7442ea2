"""Our VGG19 value-and-gradient against PyTorch's, per convolution method.

For each --sizes (square images, batch 1) it times, round-robin in one run:

  - ours: jit(value_and_grad) of the sum of relu4_2 (--layer) of
    cnnmrf_jax.vgg.VGG with random weights (vgg.init_params, the kernel
    forms made once by vgg.prepare_params), w.r.t. the image only, once per
    --convs method ('xla', 'matmul', 'winograd');
  - torch: the same VGG19 trunk written in PyTorch (benchmarks/
    _torch_worker.py: Conv2d 3x3 pad 1, ReLU, ceil-mode MaxPool2d, weights
    requires_grad=False, the input requires_grad=True, backward of the sum
    of relu4_2, torch.set_num_threads(os.cpu_count())), NCHW and
    channels_last.

Each figure is the median over --repeats of one call, printed one per line
with its unit, and the ratio torch / ours (above 1: ours is faster) against
the faster torch memory format.

torch is never a dependency of cnnmrf_jax: it runs in its own virtual
environment, in a subprocess speaking JSON lines. --torch_python points at
that environment's python; without it the script creates --torch_venv (CPU
torch pinned to --torch_version; an unpinned torch pulls a CUDA build) on
first use. --notorch times ours only.

    python benchmarks/bench_peers.py                       # 384 and 512 px
    python benchmarks/bench_peers.py --sizes 384 --repeats 3 \\
        --convs xla winograd
    python benchmarks/bench_peers.py --torch_python /work/torch_venv/bin/python
    python benchmarks/bench_peers.py --notorch --sizes 256

The `bench` extra of setup.py pins the same torch for a venv made by hand:
  python3 -m venv /work/torch_venv && /work/torch_venv/bin/pip install \
      torch==2.13.0
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np

from cnnmrf_jax import conv as conv_lib
from cnnmrf_jax import vgg

_WORKER = _ROOT / "benchmarks" / "_torch_worker.py"
_TORCH_PIN = "2.13.0"  # the CPU wheel; keep in step with setup.py's bench
_DEFAULT_VENV = pathlib.Path.home() / ".cache" / "cnnmrf_jax" / "torch_venv"


def _parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", type=int, nargs="+", default=[384, 512])
  parser.add_argument("--convs", nargs="+", default=["xla", "matmul",
                                                     "winograd"],
                      choices=conv_lib.CONVS)
  parser.add_argument("--layer", default="relu4_2")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--torch", dest="torch", action="store_true",
                      default=True)
  parser.add_argument("--notorch", dest="torch", action="store_false")
  parser.add_argument("--torch_python", default=None,
                      help="python of a venv with torch installed")
  parser.add_argument("--torch_venv", default=str(_DEFAULT_VENV),
                      help="venv created when --torch_python is not given")
  parser.add_argument("--torch_version", default=_TORCH_PIN)
  args = parser.parse_args(argv)
  vgg.check_layers([args.layer], flag="layer")
  if args.repeats < 1 or any(s < 32 for s in args.sizes):
    parser.error("--repeats must be >= 1 and --sizes >= 32")
  if args.torch_python and not os.access(args.torch_python, os.X_OK):
    parser.error(f"--torch_python: {args.torch_python} is not an executable")
  return args


def _torch_python(args: argparse.Namespace) -> str:
  """The python of torch's venv, created with pinned CPU torch if needed."""
  if args.torch_python:
    return args.torch_python
  venv = pathlib.Path(args.torch_venv)
  python = venv / "bin" / "python"
  if not python.exists():
    print(f"creating {venv} with torch=={args.torch_version}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q",
                    f"torch=={args.torch_version}"], check=True)
  return str(python)


class _TorchWorker:
  """benchmarks/_torch_worker.py in a subprocess, one JSON line each way."""

  def __init__(self, python: str):
    self.process = subprocess.Popen(
        [python, str(_WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True)

  def ask(self, **request) -> dict:
    self.process.stdin.write(json.dumps(request) + "\n")
    self.process.stdin.flush()
    line = self.process.stdout.readline()
    if not line:
      raise RuntimeError("the torch worker exited; see its stderr above")
    answer = json.loads(line)
    if "error" in answer:
      raise RuntimeError(f"torch worker: {answer['error']}")
    return answer

  def close(self) -> None:
    self.ask_quit()

  def ask_quit(self) -> None:
    self.process.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
    self.process.stdin.flush()
    self.process.wait(timeout=60)


def _our_step(method: str, layer: str, size: int):
  """A zero-argument callable running one value-and-grad, compiled."""
  # The kernels' forms for `method` are made once, as a synthesis would.
  params = vgg.prepare_params(
      jax.tree.map(jnp.asarray, vgg.init_params("vgg19")), method,
      layers=[layer])
  model = vgg.VGG(conv=method)

  def loss(params, image):
    features = model.apply({"params": params}, image, outputs=[layer])
    return jnp.sum(features[layer])

  step = jax.jit(jax.value_and_grad(loss, argnums=1))
  # A preprocessed-image scale (Caffe convention: about +-128).
  image = 64.0 * jax.random.normal(jax.random.key(0), (1, size, size, 3))
  result = jax.block_until_ready(step(params, image))

  def run() -> float:
    start = time.perf_counter()
    jax.block_until_ready(step(params, image))
    return time.perf_counter() - start
  return run, result


def _differences(ours, ref) -> str:
  """Max abs and max abs / max |ref| of value and gradient vs the ref."""
  parts = []
  for what, a, b in (("value", ours[0], ref[0]), ("grad", ours[1], ref[1])):
    diff = float(jnp.max(jnp.abs(a - b)))
    parts.append(f"{what} max abs {diff:.3g} rel "
                 f"{diff / float(jnp.max(jnp.abs(b))):.3g}")
  return ", ".join(parts)


def _flops(layer: str, size: int) -> float:
  """Multiply-adds x 2 of the forward convolutions up to `layer`, x 2 for
  the input gradient (the weights get none)."""
  names = vgg.layer_names()
  shapes = vgg.conv_shapes()
  total, side = 0.0, size
  for name in names[:names.index(layer) + 1]:
    if name.startswith("pool"):
      side = -(-side // 2)
    elif name.startswith("conv"):
      _, _, c_in, c_out = shapes[name]["kernel"]
      grad = 0 if name == "conv1_1" else 1  # no gradient below the image
      total += 2.0 * side * side * 9 * c_in * c_out * (1 + grad)
  return total


def main(argv=None) -> None:
  args = _parse_args(argv)
  print(f"jax {jax.__version__} backend {jax.default_backend()}, "
        f"{os.cpu_count()} cpus; auto -> "
        f"{conv_lib.resolve('auto')}", flush=True)
  worker = _TorchWorker(_torch_python(args)) if args.torch else None
  try:
    for size in args.sizes:
      runners, results = {}, {}
      for method in args.convs:
        start = time.perf_counter()
        runners[f"ours_{method}"], results[method] = _our_step(
            method, args.layer, size)
        print(f"{size}px compile+first ours_{method}: "
              f"{time.perf_counter() - start:.1f} s", flush=True)
        if "xla" in results and method != "xla":
          print(f"{size}px ours_{method} vs ours_xla: "
                f"{_differences(results[method], results['xla'])}",
                flush=True)
      if worker is not None:
        for channels_last in (False, True):
          key = worker.ask(cmd="setup", size=size, layer=args.layer,
                           channels_last=channels_last)["key"]
          name = "torch_" + ("nhwc" if channels_last else "nchw")
          runners[name] = (
              lambda key=key: worker.ask(cmd="time", key=key)["seconds"])
          runners[name]()  # warm-up
      times = {name: [] for name in runners}
      for _ in range(args.repeats):
        for name, run in runners.items():
          times[name].append(run())
      medians = {name: statistics.median(t) for name, t in times.items()}
      flops = _flops(args.layer, size)
      torch_best = min((t for n, t in medians.items()
                        if n.startswith("torch")), default=None)
      for name, seconds in medians.items():
        line = (f"{size}px {args.layer} value+grad {name}: "
                f"{seconds * 1e3:.1f} ms ({flops / seconds / 1e9:.0f} GFLOP/s"
                f" of direct convolution)")
        if torch_best is not None and name.startswith("ours"):
          line += f", torch_best/ours {torch_best / seconds:.2f}x"
        print(line, flush=True)
  finally:
    if worker is not None:
      worker.close()


if __name__ == "__main__":
  main()
