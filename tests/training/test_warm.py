"""A warm trainer's base model (training/warm.py): a job run on it gets exactly what a job
run in a fresh process gets, whatever another tenant's job did on it before."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.conftest import memorisation_jsonl
from tests.training.test_sft import make_spec
from training.lora import load_base_model
from training.recipes import recipe_for
from training.spec import TrainingSpec
from training.storage import LocalStore, open_store
from training.warm import WarmBase
from training.warm_trainer import WarmTrainer


def other_tenants_jsonl() -> bytes:
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Answer in capitals."},
                {"role": "user", "content": f"Name colour {i}."},
                {"role": "assistant", "content": f"COLOUR {i} IS VERMILION."},
            ]
        }
        for i in range(12)
    ]
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def train(spec: TrainingSpec, tmp_path: Path, warm: WarmBase | None) -> dict[str, torch.Tensor]:
    """The run's adapter weights."""
    store = open_store(spec.storage_url)
    scratch = tmp_path / "scratch" / spec.job_id
    scratch.mkdir(parents=True)
    run = recipe_for(spec.method)(spec, store, scratch, warm=warm)
    try:
        assert run.run() == "completed"
        run.save_adapter()
    finally:
        run.close()
    local = store.local_folder(spec.adapter_key)
    assert local is not None
    return load_file(Path(local) / "adapter_model.safetensors")


def test_a_job_on_a_warm_trainer_trains_as_in_a_fresh_process_after_another_tenants_job(
    tmp_path, tiny_model_dir
):
    store = LocalStore(tmp_path / "store")
    store.put_bytes("train.jsonl", memorisation_jsonl())
    store.put_bytes("other.jsonl", other_tenants_jsonl())

    def tenant_b(name: str) -> TrainingSpec:
        return make_spec(tmp_path, tiny_model_dir, name, store=store, seed=11)

    cold = train(tenant_b("cold"), tmp_path, warm=None)

    warm = WarmBase(str(tiny_model_dir), torch.device("cpu"))
    # Another tenant's job first, as different as a job can be: its data, seed, adapter
    # shape, gradient checkpointing, chat template, and a pause request it never sees.
    tenant_a = make_spec(
        tmp_path,
        tiny_model_dir,
        "tenant-a",
        store=store,
        training_file="other.jsonl",
        seed=3,
        chat_template="{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}",
        hyperparameters={"lora_r": 16, "lora_alpha": 32, "gradient_checkpointing": True},
    )
    warm.prepare()  # copies made before the job, as an idle trainer makes them
    train(tenant_a, tmp_path, warm)
    warm.prepare()
    warm_b = train(tenant_b("warm"), tmp_path, warm)

    assert warm_b.keys() == cold.keys()
    for name, tensor in cold.items():
        assert torch.equal(warm_b[name], tensor), f"{name} differs from the fresh process's"
    # The original the copies come from is as loaded: no adapter layers, same weights.
    fresh = load_base_model(str(tiny_model_dir), torch.device("cpu")).state_dict()
    kept = warm._model.state_dict()
    assert kept.keys() == fresh.keys()
    assert all(torch.equal(kept[name], fresh[name]) for name in fresh)
    assert warm._tokenizer.chat_template != tenant_a.chat_template


def test_a_warm_trainer_runs_every_job_on_the_one_thread_it_warmed_up_on(tiny_model_dir):
    """Ray hands an actor's calls to any of its threads; the trainer's jobs all run on one,
    where its torch threads were set (each computing thread has an OpenMP team of its own,
    and more teams than cores made jobs 30% slower: training/warm_trainer.py)."""
    trainer = WarmTrainer(str(tiny_model_dir), use_gpu=False, torch_threads=1)
    ran_on: list[int] = []

    def record(storage_url: str, spec_key: str) -> tuple[str, str]:
        ran_on.append(threading.get_ident())
        return "SUCCEEDED", ""

    trainer._run = record  # type: ignore[method-assign]
    callers = [
        threading.Thread(target=trainer.run, args=(f"attempt-{i}", "url", "key")) for i in range(3)
    ]
    for caller in callers:
        caller.start()
        caller.join()
    assert trainer.ready()
    assert len(ran_on) == 3 and len(set(ran_on)) == 1
    assert ran_on[0] not in {caller.ident for caller in callers}
    assert trainer.state_of("attempt-2") == ("SUCCEEDED", "")
