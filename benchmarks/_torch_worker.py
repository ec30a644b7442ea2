"""PyTorch side of benchmarks/bench_peers.py, run in torch's own venv.

Reads one JSON request per line on stdin, answers one JSON line on stdout:

  {"cmd": "setup", "size": 384, "layer": "relu4_2", "channels_last": false}
      builds a VGG19 trunk (3x3 pad-1 convolutions, ReLU, 2x2 ceil-mode max
      pooling, the layer shapes of cnnmrf_jax.vgg) up to `layer`, random
      weights with requires_grad=False, and a [1, 3, size, size] input with
      requires_grad=True; answers {"ok": true, "key": ...}.
  {"cmd": "time", "key": ...}
      runs one forward to `layer`, the backward of the sum of that layer's
      activation to the input, and answers {"seconds": ...}.
  {"cmd": "quit"}

Only torch is imported (no numpy), with torch.set_num_threads(os.cpu_count())
as the peer implementations run on CPU.
"""

import json
import os
import sys
import time

import torch

_BLOCKS = ((2, 64), (2, 128), (4, 256), (4, 512), (4, 512))


def _trunk(layer: str) -> torch.nn.Sequential:
  """VGG19 conv/relu/pool modules up to and including `layer`."""
  modules = []
  in_channels = 3
  for block, (num_convs, channels) in enumerate(_BLOCKS, start=1):
    for i in range(1, num_convs + 1):
      modules.append(torch.nn.Conv2d(in_channels, channels, 3, padding=1))
      modules.append(torch.nn.ReLU(inplace=False))
      in_channels = channels
      if layer in (f"conv{block}_{i}", f"relu{block}_{i}"):
        if layer.startswith("conv"):
          modules.pop()
        return torch.nn.Sequential(*modules)
    modules.append(torch.nn.MaxPool2d(2, 2, ceil_mode=True))
    if layer == f"pool{block}":
      return torch.nn.Sequential(*modules)
  raise ValueError(f"unknown layer {layer!r}")


def main() -> None:
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  setups = {}
  for line in sys.stdin:
    request = json.loads(line)
    if request["cmd"] == "quit":
      break
    if request["cmd"] == "setup":
      model = _trunk(request["layer"]).eval()
      for parameter in model.parameters():
        parameter.requires_grad_(False)
      image = torch.randn(1, 3, request["size"], request["size"])
      if request.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
        image = image.contiguous(memory_format=torch.channels_last)
      image.requires_grad_(True)
      key = str(len(setups))
      setups[key] = (model, image)
      answer = {"ok": True, "key": key, "threads": torch.get_num_threads(),
                "torch": torch.__version__}
    elif request["cmd"] == "time":
      model, image = setups[request["key"]]
      start = time.perf_counter()
      image.grad = None
      model(image).sum().backward()
      _ = float(image.grad[0, 0, 0, 0])  # the gradient exists and is read
      answer = {"seconds": time.perf_counter() - start}
    else:
      answer = {"error": f"unknown command {request['cmd']!r}"}
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
  main()
