"""Adapters out and in through the API (no Ray, no engine): an uploaded PEFT adapter is
checked against the base model, registered, listed and downloaded back byte for byte; what
the engine could not serve is refused with a 400 naming the problem."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from service.models.adapters import linear_layers
from tests.adapters import zero_bomb
from tests.service.test_api import assert_envelope
from training.hyperparameters import ResolvedHyperparameters
from training.lora import build_lora_model
from training.storage import open_store


@pytest.fixture
def api(client, parts, tiny_model_dir):  # type: ignore[no-untyped-def]
    """The client, with the base model's config where the import check reads it."""
    base = parts["base_models"]["ftaas-tiny"]
    parts["models"].base_models["ftaas-tiny"] = base.model_copy(
        update={"path": str(tiny_model_dir)}
    )
    parts["files"].max_upload_bytes = 10_000_000
    return client


def peft_folder(tmp_path: Path, model_dir: Path, name: str = "adapter", **lora) -> Path:
    settings = {"lora_r": 8, "target_modules": ["q_proj", "v_proj"]} | lora
    hp = ResolvedHyperparameters(
        n_epochs=1, batch_size=1, learning_rate_multiplier=1, learning_rate=0, **settings
    )
    model = build_lora_model(str(model_dir), hp, torch.device("cpu"))
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            if "lora_B" in key:
                parameter.normal_()
    model.save_pretrained(tmp_path / name, safe_serialization=True)
    return tmp_path / name


def tar_gz(folder: Path, prefix: str = "my-adapter") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=f"{prefix}/{path.name}")
    return buffer.getvalue()


def upload(client, content: bytes, name: str = "adapter.tar.gz") -> str:
    response = client.post(
        "/v1/files", files={"file": (name, content)}, data={"purpose": "user_data"}
    )
    assert response.status_code == 200, response.text
    return response.json()["id"]


def register(client, content: bytes, **extra):
    body = {"base_model": "ftaas-tiny", "adapter_file": upload(client, content)} | extra
    return client.post("/v1/models", json=body)


def test_an_uploaded_adapter_becomes_a_model_and_downloads_back_the_same(
    api, parts, tmp_path, tiny_model_dir
):
    folder = peft_folder(tmp_path, tiny_model_dir)
    created = register(api, tar_gz(folder), suffix="imported")
    assert created.status_code == 200, created.text
    model = created.json()
    assert model["id"].startswith("ft:ftaas-tiny:local:imported:")
    assert model["owned_by"] == "local" and model["object"] == "model"
    assert model["id"] in {m["id"] for m in api.get("/v1/models").json()["data"]}
    assert api.get(f"/v1/models/{model['id']}").json()["id"] == model["id"]

    download = api.get(f"/v1/models/{model['id']}/adapter")
    assert download.status_code == 200 and download.headers["content-type"] == "application/gzip"
    assert download.headers["content-disposition"].endswith('.tar.gz"')
    with tarfile.open(fileobj=io.BytesIO(download.content), mode="r:gz") as tar:
        names = sorted(tar.getnames())
        out = tmp_path / "downloaded"
        tar.extractall(out, filter="data")
    assert [n.split("/", 1)[1] for n in names] == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    [unpacked] = list(out.iterdir())
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (unpacked / name).read_bytes() == (folder / name).read_bytes()

    # Deleting an imported model deletes its files too.
    stored = [item.key for item in parts["blobs"].list("imported")]
    deleted = api.delete(f"/v1/models/{model['id']}")
    assert stored and deleted.status_code == 200 and deleted.json()["deleted"]
    assert list(parts["blobs"].list("imported")) == []
    assert_envelope(api.get(f"/v1/models/{model['id']}/adapter"), 404, "model")


def test_a_zip_archive_is_accepted_too(api, tmp_path, tiny_model_dir):
    folder = peft_folder(tmp_path, tiny_model_dir)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        for path in folder.iterdir():
            zipped.write(path, arcname=path.name)
    assert register(api, buffer.getvalue()).status_code == 200


def _rewrite(folder: Path, config: dict | None = None, weights: dict | None = None) -> Path:
    if config is not None:
        current = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps(current | config))
    if weights is not None:
        save_file(weights, str(folder / "adapter_model.safetensors"))
    return folder


def test_adapters_the_engine_cannot_serve_are_refused_with_the_reason(
    api, tmp_path, tiny_model_dir
):
    def fresh(name: str, **lora) -> Path:
        return peft_folder(tmp_path, tiny_model_dir, name, **lora)

    weights = load_file(str(fresh("w") / "adapter_model.safetensors"))
    some_key = next(iter(weights))
    cases = {
        "rank": fresh("rank", lora_r=32),  # ftaas-tiny's engine serves ranks up to 16
        "modules_to_save": _rewrite(fresh("mts"), {"modules_to_save": ["lm_head"]}),
        "DoRA": _rewrite(fresh("dora"), {"use_dora": True}),
        "biases": _rewrite(fresh("bias"), {"bias": "all"}),
        "lora_alpha": _rewrite(fresh("alpha"), {"lora_alpha": "sixteen"}),
        "LoRA": _rewrite(fresh("ia3"), {"peft_type": "IA3"}),
        "lm_head": _rewrite(
            fresh("head"),
            weights=weights | {"base_model.model.lm_head.lora_A.weight": torch.zeros(8, 128)},
        ),
        "does not have": _rewrite(
            fresh("layer"),
            weights={
                some_key.replace("layers.0", "layers.7"): weights[some_key],
            },
        ),
        "shape": _rewrite(fresh("shape"), weights=weights | {some_key: torch.zeros(8, 64)}),
    }
    for reason, folder in cases.items():
        error = assert_envelope(register(api, tar_gz(folder)), 400, "adapter_file")
        assert reason in error["message"], (reason, error["message"])
    # Not an archive, an archive without the weights, an unknown base model or file.
    error = assert_envelope(register(api, b"not an archive"), 400, "adapter_file")
    assert "archive" in error["message"]
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "adapter_config.json").write_text("{}")
    error = assert_envelope(register(api, tar_gz(tmp_path / "config-only")), 400, "adapter_file")
    assert "adapter_model.safetensors" in error["message"]
    good = tar_gz(fresh("good"))
    assert_envelope(register(api, good, base_model="nope"), 400, "base_model")
    missing = {"base_model": "ftaas-tiny", "adapter_file": "file-nope"}
    assert_envelope(api.post("/v1/models", json=missing), 400, "adapter_file")
    assert [m["owned_by"] for m in api.get("/v1/models").json()["data"]] == ["ftaas"]


def test_an_archive_that_inflates_to_gigabytes_is_refused_from_its_first_bytes(api):
    # More than the largest adapter ftaas-tiny's engine serves: refused on its size alone.
    bomb = zero_bomb(8 * 1024**3)  # the old bound's 8 GiB, in 8 MB
    assert len(bomb) < 10_000_000
    error = assert_envelope(register(api, bomb), 400, "adapter_file")
    assert "adapter_model.safetensors is 8589934592 bytes, more than " in error["message"]
    # Within that size, refused by its first eight bytes.
    error = assert_envelope(register(api, zero_bomb(16 * 1024**2)), 400, "adapter_file")
    assert "not a safetensors file (its header would be 0 bytes)" in error["message"]
    # A header whose matrix is not one the base model has: refused by its header.
    header = json.dumps(
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
         {"dtype": "F32", "shape": [8, 1000], "data_offsets": [0, 32_000]}}
    ).encode()  # fmt: skip
    weights = len(header).to_bytes(8, "little") + header + b"\0" * 32_000
    member = tarfile.TarInfo("a/adapter_model.safetensors")
    member.size = len(weights)
    crafted = gzip.compress(member.tobuf(format=tarfile.PAX_FORMAT) + weights)
    error = assert_envelope(register(api, crafted), 400, "adapter_file")
    assert "has shape [8, 1000]; ftaas-tiny needs [8, " in error["message"]


def test_only_tuned_models_of_ones_own_organization_download(api, tmp_path, tiny_model_dir):
    assert_envelope(api.get("/v1/models/ftaas-tiny/adapter"), 400, "model")
    assert_envelope(api.get("/v1/models/ft:ftaas-tiny:other:x:abcdefgh/adapter"), 404, "model")


def test_an_imported_model_belongs_to_the_organization_that_imported_it(
    tmp_path, parts, tiny_model_dir
):
    from service.config import Settings
    from tests.service.conftest import api_client

    settings = Settings(home=tmp_path, api_keys="key-a:org-a,key-b:org-b", serving_enabled=False)
    client = api_client(settings, parts)
    base = parts["base_models"]["ftaas-tiny"]
    parts["models"].base_models["ftaas-tiny"] = base.model_copy(
        update={"path": str(tiny_model_dir)}
    )
    parts["files"].max_upload_bytes = 10_000_000
    a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
    archive = tar_gz(peft_folder(tmp_path, tiny_model_dir))
    file_id = client.post(
        "/v1/files", files={"file": ("a.tar.gz", archive)}, data={"purpose": "user_data"}, headers=a
    ).json()["id"]
    body = {"base_model": "ftaas-tiny", "adapter_file": file_id}
    # B cannot register A's upload, nor see, download or delete A's model.
    assert_envelope(client.post("/v1/models", json=body, headers=b), 400, "adapter_file")
    model = client.post("/v1/models", json=body, headers=a).json()["id"]
    assert model.startswith("ft:ftaas-tiny:org-a::")
    assert_envelope(client.get(f"/v1/models/{model}", headers=b), 404, "model")
    assert_envelope(client.get(f"/v1/models/{model}/adapter", headers=b), 404, "model")
    assert model not in {m["id"] for m in client.get("/v1/models", headers=b).json()["data"]}
    assert client.get(f"/v1/models/{model}/adapter", headers=a).status_code == 200


def test_the_base_models_linear_layers_come_from_its_weights_headers(
    tiny_model_dir, s3_env, tmp_path
):
    """Read from safetensors headers, locally or from S3, they are exactly the model's
    torch.nn.Linear layers (the embeddings' matrices beside them, which no adapter may
    target)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    built = {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    local = linear_layers(str(tiny_model_dir))
    assert {k: v for k, v in local.items() if "embed" not in k} == built
    bucket = s3_env.new_bucket()
    open_store(f"s3://{bucket}").put_folder(tiny_model_dir, "models/tiny")
    assert linear_layers(f"s3://{bucket}/models/tiny") == local


def router_base(tmp_path: Path) -> Path:
    """A Llama base whose layer has one more Linear layer, a MoE-style router, which
    peft's all-linear adapts and vLLM's Llama applies no LoRA to."""
    folder = tmp_path / "router-base"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    shapes = {
        "model.embed_tokens": (512, 128),
        "model.layers.0.self_attn.q_proj": (128, 128),
        "model.layers.0.self_attn.v_proj": (128, 128),
        "model.layers.0.mlp.router": (4, 128),
        "lm_head": (512, 128),
    }
    save_file(
        {f"{name}.weight": torch.zeros(shape) for name, shape in shapes.items()},
        str(folder / "model.safetensors"),
    )
    return folder


def _use_base(parts, path: Path) -> None:  # type: ignore[no-untyped-def]
    base = parts["base_models"]["ftaas-tiny"]
    parts["base_models"]["ftaas-tiny"] = base.model_copy(update={"path": str(path)})


def _create_job(api, **hyperparameters):  # type: ignore[no-untyped-def]
    from tests.conftest import memorisation_jsonl
    from tests.service.test_api import supervised
    from tests.service.test_api import upload as upload_file

    file_id = upload_file(api, memorisation_jsonl()).json()["id"]
    body = {"model": "ftaas-tiny", "training_file": file_id, **supervised(**hyperparameters)}
    return api.post("/v1/fine_tuning/jobs", json=body)


def test_a_job_that_would_adapt_a_layer_vllm_does_not_serve_is_refused_before_training(
    api, parts, tmp_path, tiny_model_dir
):
    # The real tiny model: all-linear adapts its projections (never embed_tokens, lm_head).
    assert _create_job(api).status_code == 200
    error = assert_envelope(
        _create_job(api, target_modules=["q_proj", "lm_head"]),
        400,
        "method.supervised.hyperparameters.target_modules",
    )
    assert error["message"] == (
        "target_modules: lm_head is not a layer the engine serving ftaas-tiny applies LoRA "
        "to; it serves LoRA on down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"
    )
    error = assert_envelope(
        _create_job(api, target_modules=["qkv"]),
        400,
        "method.supervised.hyperparameters.target_modules",
    )
    assert error["message"] == "target_modules: qkv matches no linear layer of ftaas-tiny"
    # A base with a router: all-linear would train it, and no engine could load the result.
    _use_base(parts, router_base(tmp_path))
    error = assert_envelope(
        _create_job(api), 400, "method.supervised.hyperparameters.target_modules"
    )
    assert error["message"] == (
        "target_modules: all-linear includes model.layers.0.mlp.router, which is not a layer "
        "the engine serving ftaas-tiny applies LoRA to; it serves LoRA on down_proj, "
        "gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj: name the layers to adapt in "
        "target_modules instead"
    )
    assert _create_job(api, target_modules=["q_proj", "v_proj"]).status_code == 200
    error = assert_envelope(
        _create_job(api, lora_r=32), 400, "method.supervised.hyperparameters.lora_r"
    )
    assert error["message"] == (
        "lora_r: rank 32 is outside 1..16, the adapter ranks the engine serving ftaas-tiny accepts"
    )


def test_an_adapter_of_a_layer_vllm_does_not_serve_is_refused_at_import(api, parts, tmp_path):
    _use_base(parts, router_base(tmp_path))
    folder = tmp_path / "router-adapter"
    folder.mkdir()
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["router"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    prefix = "base_model.model.model.layers.0.mlp.router"
    save_file(
        {
            f"{prefix}.lora_A.weight": torch.zeros(8, 128),
            f"{prefix}.lora_B.weight": torch.zeros(4, 8),
        },
        str(folder / "adapter_model.safetensors"),
    )
    error = assert_envelope(register(api, tar_gz(folder)), 400, "adapter_file")
    assert error["message"] == (
        "The adapter has weights for model.layers.0.mlp.router, which is not a layer the "
        "engine serving ftaas-tiny applies LoRA to; it serves LoRA on down_proj, gate_proj, "
        "k_proj, o_proj, q_proj, up_proj, v_proj"
    )
    assert error["code"] == "invalid_adapter"
