"""Multi-LoRA serving: what serving many adapters from one vLLM engine costs against the
base model alone, and against the naive way (transformers + peft, one request at a time).

One vLLM `AsyncLLM` is started once, in-process, with LoRA enabled (`--max-loras` adapter
slots in a batch, `--max-cpu-loras` kept loaded in host memory, rank 16). Every mix gets
the same offered load: `--requests` requests, `--concurrency` of them in flight at once
(an asyncio semaphore), each a fresh random prompt of `--prompt-tokens` token ids (so no
tokenizer work and no prefix-cache hits) asking for exactly `--output-tokens` tokens
(greedy, `ignore_eos`). The mixes: the base model alone (no adapter), then k = 1, 8, 32,
100 distinct adapters (`--adapters`), request i using adapter i % k, then the base model
alone again. The base-alone rows before and after are both printed and their mean is the
baseline of the ratios: shared and small machines are noisy, and the two show how much.

Adapters are measured cold: before each adapter mix every adapter the engine holds is
removed, so each adapter's first load from disk (the OS page cache is warm) is part of the
mix, as it is for a server whose adapters outnumber `--max-cpu-loras`. The engine itself
is warmed once, at start, with a few base requests. Adapter mixes beyond `--max-loras`
also wait for a batch slot: a batch holds at most that many distinct adapters.

Measured in the client, per mix: output tokens per second (all requests' tokens over the
mix's wall time), time to first token (submitting to the first output carrying a token;
p50 and p99) and the p50 request latency, each also as a ratio to the baseline.

The naive peer, run after the engine is shut down so the two never share the machine:
one transformers `PeftModel` holding 8 of the same adapters, requests served one at a
time with batch 1, `set_adapter` then `generate` (greedy, exactly `--output-tokens` new
tokens). Printed: its output tokens per second, and vLLM's 8-adapter mix over it. On a
CPU the peer gets all of torch's threads while vLLM's worker leaves one core to its front
end (of 2 cores, it computes on 1): on small machines that favours the peer.

The model (`--model`): `random-llama`, a randomly initialised Llama of at least 100 M
parameters (`SERVE_MODEL`) with ftaas-tiny's tokenizer, float32 on CPU and bfloat16 on a
GPU; or `smollm2`, the embedded default SmolLM2-135M-Instruct (30 layers, vocabulary
49,152) built from its installed package, served in bfloat16 as ftaas serves it (the naive
peer runs it in float32 on a CPU, torch's fast path there). Its adapters are built in a
temporary folder (peft, r 16, alpha 32, all attention and MLP projections, random non-zero
B so each adapter really changes the outputs, one seed each): nothing is downloaded.

    .venv/bin/python bench/serve_multilora.py [--model random-llama|smollm2]
        [--requests 128] [--concurrency 64] [--prompt-tokens 64] [--output-tokens 64]
        [--adapters 1,8,32,100] [--max-loras 8] [--max-cpu-loras 32]
        [--naive-requests 16] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SERVE_MODEL = {  # about 114 M parameters, nearly all in the layers (tiny vocabulary)
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 12,
    "num_key_value_heads": 12,
    "head_dim": 64,  # vLLM's CPU attention rejects 16
    "max_position_embeddings": 512,
}
MIN_PARAMETERS = 100_000_000
MAX_MODEL_LEN = 512
LORA_RANK: Final = 16
LORA_ALPHA = 32
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NAIVE_ADAPTERS = 8
WARMUP_REQUESTS = 4
ADAPTER_SEED = 1000
TARGET_VS_BASE = 0.8
TARGET_VS_NAIVE = 5.0


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def build_smollm2_model(work: Path) -> tuple[Path, int]:
    """SmolLM2-135M-Instruct from its package (training/smollm2.py), and its size."""
    from safetensors import safe_open

    from training.smollm2 import SMOLLM2_ID, build_smollm2

    folder = build_smollm2(work / SMOLLM2_ID)
    parameters = 0
    for weights in folder.glob("*.safetensors"):
        with safe_open(weights, "pt") as tensors:
            for name in tensors.keys():  # noqa: SIM118 (safe_open is not iterable)
                parameters += math.prod(tensors.get_slice(name).get_shape())
    return folder, parameters


def build_model(work: Path) -> tuple[Path, int]:
    """A random Llama of `SERVE_MODEL`'s shape with ftaas-tiny's tokenizer, and its size."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    from training.tiny_model import build_tiny_model

    tiny = build_tiny_model(work / "ftaas-tiny")
    folder = work / "llama-serve"
    shutil.copytree(tiny, folder, ignore=shutil.ignore_patterns("*.safetensors", "ftaas_*"))
    config = AutoConfig.from_pretrained(tiny)
    for key, value in SERVE_MODEL.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    parameters = sum(p.numel() for p in model.parameters())
    if parameters < MIN_PARAMETERS:
        raise SystemExit(f"the model has {parameters:,} parameters, under {MIN_PARAMETERS:,}")
    model.save_pretrained(folder, safe_serialization=True)
    return folder, parameters


def adapter_name(i: int) -> str:
    return f"adapter-{i:03d}"


def build_adapters(model_path: Path, root: Path, count: int) -> list[Path]:
    """`count` random LoRA adapters, each in its own folder, adapter i seeded with i."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaForCausalLM

    config = LoraConfig(
        r=LORA_RANK,
        lora_alpha=LORA_ALPHA,
        target_modules=LORA_TARGETS,
        lora_dropout=0.0,
        init_lora_weights=False,  # A and B both random: every adapter changes the outputs
        task_type="CAUSAL_LM",
    )
    base = LlamaForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model: PeftModel | None = None
    paths = []
    for i in range(1, count + 1):
        name = adapter_name(i)
        torch.manual_seed(ADAPTER_SEED + i)
        if model is None:
            model = get_peft_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        # A name other than "default" is saved in its own sub-folder of `root`.
        model.save_pretrained(str(root), selected_adapters=[name], safe_serialization=True)
        if i > 1:
            model.delete_adapter(name)
        paths.append(root / name)
    del model, base
    return paths


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class MixResult:
    label: str
    adapters: int
    requests: int
    output_tokens: int
    seconds: float
    ttft: list[float]
    latency: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def ttft_p50(self) -> float:
        return percentile(self.ttft, 50)

    @property
    def ttft_p99(self) -> float:
        return percentile(self.ttft, 99)

    @property
    def latency_p50(self) -> float:
        return percentile(self.latency, 50)


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    first = 8  # past the special tokens
    return [[rng.randrange(first, vocab) for _ in range(length)] for _ in range(n)]


class VllmBench:
    def __init__(self, engine: Any, args: argparse.Namespace, adapters: list[Path], vocab: int):
        self.engine = engine
        self.args = args
        self.adapters = adapters
        self.vocab = vocab
        self.counter = 0
        self.seed = 0

    def lora(self, i: int) -> Any:
        from vllm.lora.request import LoRARequest

        return LoRARequest(adapter_name(i), i, str(self.adapters[i - 1]))

    def sampling(self, output_tokens: int) -> Any:
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        return SamplingParams(
            max_tokens=output_tokens,
            min_tokens=output_tokens,
            ignore_eos=True,
            temperature=0.0,
            output_kind=RequestOutputKind.DELTA,
        )

    async def one(
        self, prompt: list[int], lora: Any, output_tokens: int
    ) -> tuple[float, float, list[int]]:
        """(time to first token, latency, output ids) of one request."""
        from vllm.inputs import TokensPrompt

        self.counter += 1
        request_id = f"bench-{self.counter}"
        tokens: list[int] = []
        first = float("nan")
        started = time.perf_counter()
        async for output in self.engine.generate(
            TokensPrompt(prompt_token_ids=prompt),
            self.sampling(output_tokens),
            request_id,
            lora_request=lora,
        ):
            new = output.outputs[0].token_ids
            if new and not tokens:
                first = time.perf_counter() - started
            tokens.extend(new)
        return first, time.perf_counter() - started, tokens

    async def drop_adapters(self) -> None:
        for lora_id in sorted(await self.engine.list_loras()):
            await self.engine.remove_lora(lora_id)

    async def mix(self, label: str, adapters: int) -> MixResult:
        """`--requests` requests, `--concurrency` in flight, request i on adapter i % k."""
        args = self.args
        await self.drop_adapters()
        self.seed += 1
        prompts = random_prompts(args.requests, args.prompt_tokens, self.vocab, self.seed)
        gate = asyncio.Semaphore(args.concurrency)

        async def request(i: int) -> tuple[float, float, list[int]]:
            lora = self.lora(i % adapters + 1) if adapters else None
            async with gate:
                return await self.one(prompts[i], lora, args.output_tokens)

        started = time.perf_counter()
        results = await asyncio.gather(*(request(i) for i in range(args.requests)))
        seconds = time.perf_counter() - started
        return MixResult(
            label=label,
            adapters=adapters,
            requests=args.requests,
            output_tokens=sum(len(r[2]) for r in results),
            seconds=seconds,
            ttft=[r[0] for r in results],
            latency=[r[1] for r in results],
        )

    async def warm_up(self) -> None:
        prompts = random_prompts(WARMUP_REQUESTS, self.args.prompt_tokens, self.vocab, 10_000)
        await asyncio.gather(*(self.one(p, None, self.args.output_tokens) for p in prompts))

    async def adapters_differ(self) -> int:
        """How many distinct greedy outputs one prompt gets from the base and two adapters."""
        (prompt,) = random_prompts(1, self.args.prompt_tokens, self.vocab, 20_000)
        loras = [None, self.lora(1), self.lora(2)] if len(self.adapters) >= 2 else [None]
        outputs = [await self.one(prompt, lora, 16) for lora in loras]
        await self.drop_adapters()
        return len({tuple(o[2]) for o in outputs})


def engine_dtype(args: argparse.Namespace) -> str:
    if args.dtype != "auto":
        return str(args.dtype)
    return "bfloat16" if on_gpu() or args.model == "smollm2" else "float32"


def engine_args(model_path: Path, args: argparse.Namespace) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs

    gpu = on_gpu()
    return AsyncEngineArgs(
        model=str(model_path),
        dtype=engine_dtype(args),
        max_model_len=MAX_MODEL_LEN,
        enable_lora=True,
        max_lora_rank=LORA_RANK,
        max_loras=args.max_loras,
        max_cpu_loras=args.max_cpu_loras,
        max_num_seqs=args.concurrency,
        enforce_eager=not gpu,
        disable_log_stats=True,
        seed=0,
    )


async def measure(bench: VllmBench) -> tuple[list[MixResult], int]:
    """Warm-up, the adapters check, then base, each adapter mix, and base again."""
    await bench.warm_up()
    distinct = await bench.adapters_differ()
    mixes = [("base (before)", 0)]
    mixes += [(f"{k} adapter{'s' if k > 1 else ''}", k) for k in bench.args.adapter_counts]
    mixes += [("base (after)", 0)]
    results = []
    for label, k in mixes:
        results.append(await bench.mix(label, k))
        print(f"  {label}: {results[-1].tokens_per_s:.1f} tok/s", flush=True)
    return results, distinct


async def run_vllm(
    model_path: Path, adapters: list[Path], args: argparse.Namespace, vocab: int
) -> tuple[list[MixResult], int]:
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(engine_args(model_path, args))
    try:
        return await measure(VllmBench(engine, args, adapters, vocab))
    finally:
        engine.shutdown()
        # shutdown's lazy imports leave a traceback in vLLM that holds this frame: with
        # the engine still in it, its __del__ runs at exit, after the modules it needs.
        del engine


def run_naive(
    model_path: Path, adapters: list[Path], args: argparse.Namespace, vocab: int
) -> tuple[int, float, int]:
    """transformers + peft, one request at a time over `NAIVE_ADAPTERS` adapters."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    gpu = on_gpu()
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    base = LlamaForCausalLM.from_pretrained(model_path, dtype=dtype)
    names = [adapter_name(i) for i in range(1, NAIVE_ADAPTERS + 1)]
    model = PeftModel.from_pretrained(base, adapters[0], adapter_name=names[0])
    for name, path in zip(names[1:], adapters[1:NAIVE_ADAPTERS], strict=True):
        model.load_adapter(path, adapter_name=name)
    model = model.to(device).eval()
    prompts = random_prompts(args.naive_requests + 1, args.prompt_tokens, vocab, 30_000)
    pad = base.config.pad_token_id

    def generate(i: int, prompt: list[int]) -> int:
        model.set_adapter(names[i % len(names)])
        ids = torch.tensor([prompt], device=device)
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=args.output_tokens,
            min_new_tokens=args.output_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        return int(out.shape[1] - ids.shape[1])

    with torch.inference_mode():
        generate(0, prompts[-1])  # warm-up
        if gpu:
            torch.cuda.synchronize()
        started = time.perf_counter()
        tokens = sum(generate(i, p) for i, p in enumerate(prompts[:-1]))
        if gpu:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    return tokens, seconds, torch.get_num_threads()


def describe_device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name()}"
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def ratio(value: float, baseline: float) -> str:
    return f"{value / baseline:.2f}" if baseline else "-"


def print_table(results: list[MixResult], naive: tuple[int, float, int]) -> None:
    before, after = results[0], results[-1]
    tps = (before.tokens_per_s + after.tokens_per_s) / 2
    p50 = (before.ttft_p50 + after.ttft_p50) / 2
    p99 = (before.ttft_p99 + after.ttft_p99) / 2
    header = (
        f"{'mix':<16}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p99':>10}{'lat p50':>9}"
        f"{'tok/s÷base':>12}{'p50÷base':>10}{'p99÷base':>10}"
    )
    print()
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.label:<16}{r.tokens_per_s:>9.1f}{r.ttft_p50:>9.3f}s{r.ttft_p99:>9.3f}s"
            f"{r.latency_p50:>8.2f}s{ratio(r.tokens_per_s, tps):>12}"
            f"{ratio(r.ttft_p50, p50):>10}{ratio(r.ttft_p99, p99):>10}"
        )
    naive_tokens, naive_seconds, naive_threads = naive
    naive_tps = naive_tokens / naive_seconds
    print(
        f"{'naive peft (8)':<16}{naive_tps:>9.1f}   (batch 1, one request at a time, "
        f"{naive_threads} torch threads)"
    )
    spread = abs(before.tokens_per_s - after.tokens_per_s) / tps
    print(
        f"\nbaseline: the mean of the two base rows ({before.tokens_per_s:.1f} and "
        f"{after.tokens_per_s:.1f} tok/s, {spread:.0%} apart: this machine's noise)"
    )
    eight = next((r for r in results if r.adapters == NAIVE_ADAPTERS), None)
    if eight is None:
        print(f"no {NAIVE_ADAPTERS}-adapter mix measured: no target checks")
        return
    print(
        f"{NAIVE_ADAPTERS} adapters / base: {eight.tokens_per_s / tps:.2f} "
        f"(target >= {TARGET_VS_BASE})"
    )
    print(
        f"vLLM {NAIVE_ADAPTERS} adapters / naive transformers+peft: "
        f"{eight.tokens_per_s / naive_tps:.1f}x (target >= {TARGET_VS_NAIVE:g}x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["random-llama", "smollm2"], default="random-llama")
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--adapters", default="1,8,32,100", help="adapter counts, one mix each")
    parser.add_argument("--max-loras", type=int, default=8, help="adapters in one batch")
    parser.add_argument("--max-cpu-loras", type=int, default=32, help="adapters kept loaded")
    parser.add_argument("--naive-requests", type=int, default=16)
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="vLLM's dtype; auto: bfloat16 on a GPU and for smollm2 (as ftaas serves it)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 16 requests, concurrency 8, 16 output tokens, adapters 1,8, "
        "4 naive requests",
    )
    args = parser.parse_args()
    if args.quick:
        args.requests, args.concurrency, args.output_tokens = 16, 8, 16
        args.adapters, args.naive_requests = "1,8", 4
    args.adapter_counts = [int(k) for k in args.adapters.split(",") if k.strip()]
    if args.prompt_tokens + args.output_tokens > MAX_MODEL_LEN:
        raise SystemExit(f"prompt + output tokens must fit in {MAX_MODEL_LEN}")

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; read on CPU only
    import torch
    import vllm
    from transformers import AutoConfig

    with tempfile.TemporaryDirectory(prefix="ftaas-serve-bench-") as tmp:
        work = Path(tmp)
        if args.model == "smollm2":
            model_path, parameters = build_smollm2_model(work)
        else:
            model_path, parameters = build_model(work)
        shape = AutoConfig.from_pretrained(model_path)
        vocab = shape.vocab_size
        count = max([NAIVE_ADAPTERS, *args.adapter_counts])
        started = time.perf_counter()
        adapters = build_adapters(model_path, work / "adapters", count)
        print(f"device: {describe_device()}")
        print(f"torch {torch.__version__}, vllm {vllm.__version__}")
        print(
            f"model: {args.model}, {parameters / 1e6:.1f} M parameters "
            f"({shape.num_hidden_layers} layers, hidden {shape.hidden_size}, "
            f"vocab {vocab}), vLLM in {engine_dtype(args)}"
        )
        print(
            f"adapters: {count} built in {time.perf_counter() - started:.1f}s "
            f"(r {LORA_RANK}, alpha {LORA_ALPHA}, {','.join(LORA_TARGETS)})"
        )
        print(
            f"settings: requests {args.requests}, concurrency {args.concurrency}, "
            f"prompt {args.prompt_tokens} tokens, output {args.output_tokens} tokens, "
            f"mixes {args.adapters}, max_loras {args.max_loras}, "
            f"max_cpu_loras {args.max_cpu_loras}, naive requests {args.naive_requests}"
        )
        print("vLLM (adapters cold at the start of each mix):", flush=True)
        results, distinct = asyncio.run(run_vllm(model_path, adapters, args, vocab))
        print(f"one prompt, base and adapters 1 and 2: {distinct} distinct greedy outputs")
        print("naive transformers + peft:", flush=True)
        naive = run_naive(model_path, adapters, args, vocab)
        print_table(results, naive)


if __name__ == "__main__":
    main()
