"""export-vllm on the tiny checkpoint: the exported stock Qwen2.5-VL, run the way vLLM runs it and pooled by
the client helper, gives encode()'s vectors, per task and for a custom adapter; bad input is refused.

vLLM does not run here. "The way vLLM runs it": stock transformers ``Qwen2_5_VLForConditionalGeneration`` loaded
from the export without remote code, the prompt rendered through the export's chat template from the chat
messages the client sends, tokenised by the export's tokenizer, the image placeholder expanded by the export's
image processor grid, 3D rope positions, and the final-norm hidden state of every token (token_embed pooling
with normalize off).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from helpers import make_image
from nova_embeddings.export_vllm import ExportError, export_vllm, main
from nova_embeddings.vllm_client import NovaVllmClient

TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$|.*multi_vector_projector$"
MIN_COSINE = 0.99999
TASKS = ["retrieval", "text-matching", "code"]


def items_for(task: str) -> list:
    """Texts on both sides, an image, a fused item and instructed items, all routed to one adapter."""
    query, passage = (f"{task}.query", f"{task}.passage") if task != "text-matching" else (task, task)
    return [
        {"text": "what is late interaction?", "task": query},
        {"text": "def add(a, b): return a + b", "task": passage},
        {"image": make_image(11), "task": passage},
        {"image": make_image(12, width=120, height=40), "text": "a red chart", "task": passage},
        {"text": "hello world", "task": query, "instructions": "Find physics papers"},
        {"image": make_image(13), "task": passage, "instructions": "Charts only"},
    ]


@pytest.fixture(scope="module")
def custom_adapter(tiny_nova_dir, tmp_path_factory):
    """A standard PEFT LoRA adapter with random, non-zero A and B, saved by stock PEFT."""
    torch.manual_seed(21)
    base = AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True, load_task_adapters=False)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    folder = tmp_path_factory.mktemp("custom_adapter")
    get_peft_model(base, lora).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def exports(tiny_nova_dir, custom_adapter, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    out = {task: export_vllm(tiny_nova_dir, root / task, task=task) for task in TASKS}
    assert main([str(tiny_nova_dir), str(root / "custom"), "--adapter", str(custom_adapter)]) == 0  # the CLI path
    out["custom"] = root / "custom"
    return out


@pytest.fixture(scope="module")
def model(tiny_nova_dir, custom_adapter):
    model = AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True)
    model.load_adapter(str(custom_adapter), adapter_name="custom")
    return model


def run_like_vllm(export_dir, prompt) -> tuple[list[int], torch.Tensor]:
    """Token ids and final-norm hidden states (tokens, hidden) of one prompt on the stock export."""
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    stock = Qwen2_5_VLForConditionalGeneration.from_pretrained(export_dir)
    # vLLM hands the template the message with image parts reduced to {"type": "image"}
    messages = [{"role": m["role"], "content": [p if p["type"] == "text" else {"type": "image"} for p in m["content"]]}
                for m in prompt.messages()]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == prompt.prompt
    inputs = {}
    if prompt.image is not None:
        image_processor = AutoImageProcessor.from_pretrained(export_dir)
        pixels = image_processor(images=[prompt.image], return_tensors="pt")
        count = int(pixels["image_grid_thw"][0].prod()) // image_processor.merge_size**2
        text = text.replace("<|image_pad|>", "<|image_pad|>" * count)
        inputs = {"pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"]}
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    if prompt.image is not None:
        inputs["mm_token_type_ids"] = (ids == stock.config.image_token_id).int()
    with torch.no_grad():
        out = stock(input_ids=ids, **inputs, output_hidden_states=True, use_cache=False)
    return ids[0].tolist(), out.hidden_states[-1][0]


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.to(torch.float32), b.to(torch.float32), dim=-1)


# ---------------------------------------------------------------------- the exported checkpoint
def test_export_is_a_stock_qwen2_5_vl_checkpoint(exports):
    for folder in exports.values():
        config = json.loads((folder / "config.json").read_text())
        assert config["model_type"] == "qwen2_5_vl"
        assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
        assert config["tie_word_embeddings"] is True
        assert not any(k in config for k in ("auto_map", "task_names", "task_prompts", "multi_vector_projector_dim"))
        assert not list(folder.glob("*.py"))  # no remote code at the root
        for path in folder.glob("*.json"):
            assert "auto_map" not in path.read_text() and "NovaEmbeddings" not in path.read_text(), path.name
        _, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        # what transformers 4.x (pinned by some vLLM releases) reads: M-RoPE sections, the tokenizer's special tokens
        text_config = config["text_config"]
        assert text_config["rope_scaling"]["mrope_section"] == text_config["rope_parameters"]["mrope_section"]
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
        assert "<|image_pad|>" in tokenizer_config["additional_special_tokens"]
        assert "extra_special_tokens" not in tokenizer_config
        image_config = json.loads((folder / "preprocessor_config.json").read_text())
        assert image_config["image_processor_type"] == "Qwen2VLImageProcessor"
        projector = load_file(str(folder / "multi_vector_projector.safetensors"))
        assert set(projector) == {"weight", "bias"}
        assert "vllm serve" in (folder / "README.md").read_text()


def test_dtype_option_casts_after_a_float32_merge(exports, tiny_nova_dir, tmp_path):
    out = export_vllm(tiny_nova_dir, tmp_path / "bf16", task="code", dtype="bfloat16")
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    weights = load_file(str(out / "model.safetensors"))
    reference = load_file(str(exports["code"] / "model.safetensors"))
    assert set(weights) == set(reference)
    for key, value in weights.items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, reference[key].to(torch.bfloat16)), key
    assert load_file(str(out / "multi_vector_projector.safetensors"))["weight"].dtype == torch.float32
    assert [p.name for p in tmp_path.iterdir()] == ["bf16"]  # the staging folder was renamed, nothing left


def test_export_merges_the_adapter(exports, tiny_nova_dir):
    """Every export differs from the bare backbone and from the other exports (the adapters are non-zero)."""
    weights = {name: load_file(str(folder / "model.safetensors")) for name, folder in exports.items()}
    key = next(k for k in weights["retrieval"] if k.endswith("layers.0.self_attn.q_proj.weight"))
    bare = AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True, load_task_adapters=False)
    bare_q = bare.model.language_model.layers[0].self_attn.q_proj.weight.detach()
    names = list(weights)
    for i, a in enumerate(names):
        assert (weights[a][key] - bare_q).abs().max() > 1e-4, a
        for b in names[i + 1:]:
            assert (weights[a][key] - weights[b][key]).abs().max() > 1e-4, (a, b)


# ---------------------------------------------------------------------- vectors equal encode()
@pytest.mark.parametrize("name", TASKS + ["custom"])
def test_pooled_vllm_states_equal_encode(exports, model, name):
    task = "retrieval" if name == "custom" else name
    items = items_for(task)
    kwargs = {"adapter": "custom"} if name == "custom" else {}
    client = NovaVllmClient(exports[name])
    prompts = client.build_prompts(items)
    runs = [run_like_vllm(exports[name], p) for p in prompts]
    ids, states = [r[0] for r in runs], [r[1] for r in runs]
    single = client.single_vectors(prompts, states, token_ids=ids)
    multi = client.multi_vectors(prompts, states, token_ids=ids)

    expected_single = model.encode(items, **kwargs)
    expected_multi = model.encode(items, return_multivector=True, **kwargs)
    assert cosine(single, expected_single).min() >= MIN_COSINE
    for ours, theirs in zip(multi, expected_multi):
        assert ours.shape == theirs.shape
        assert cosine(ours, theirs).min() >= MIN_COSINE
    bare = model.encode(items, adapter=None)
    assert cosine(single, bare).max() < 0.9999, "the export must not give the bare backbone's vectors"


def test_matryoshka_dimensions(exports, model):
    client = NovaVllmClient(exports["retrieval"])
    prompts = client.build_prompts(["hello world"])
    _, states = run_like_vllm(exports["retrieval"], prompts[0])
    dim = model.config.matryoshka_dims[0]
    ours = client.single_vectors(prompts, [states], dimensions=dim)
    assert ours.shape == (1, dim)
    assert cosine(ours, model.encode(["hello world"], dimensions=dim)).min() >= MIN_COSINE


def test_offline_prompt_and_request_body(exports):
    client = NovaVllmClient(exports["code"])
    image = make_image(14)
    text_prompt, image_prompt = client.build_prompts(["x = 1", {"image": image}])
    assert text_prompt.offline_prompt() == {"prompt": "Query: x = 1"}
    offline = image_prompt.offline_prompt()
    assert offline["prompt"].count("<|image_pad|>") == 1
    assert offline["multi_modal_data"]["image"].tobytes() == image.tobytes()
    body = image_prompt.pooling_request("nova-code")
    assert body["task"] == "token_embed" and body["model"] == "nova-code" and body["use_activation"] is False
    parts = body["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "text"]
    assert parts[1]["image_url"]["url"].startswith("data:image/png;base64,")


# ---------------------------------------------------------------------- errors
def test_bad_export_input_is_refused(tiny_nova_dir, custom_adapter, tmp_path, capsys):
    with pytest.raises(ExportError, match=r"unknown task 'search'.*retrieval"):
        export_vllm(tiny_nova_dir, tmp_path / "a", task="search")
    with pytest.raises(ExportError, match="no such folder"):
        export_vllm(tiny_nova_dir, tmp_path / "b", adapter=tmp_path / "missing")
    (tmp_path / "empty_adapter").mkdir()
    with pytest.raises(ExportError, match="not a PEFT adapter folder"):
        export_vllm(tiny_nova_dir, tmp_path / "c", adapter=tmp_path / "empty_adapter")
    with pytest.raises(ExportError, match="exactly one of"):
        export_vllm(tiny_nova_dir, tmp_path / "d", task="code", adapter=custom_adapter)
    with pytest.raises(ExportError, match="exactly one of"):
        export_vllm(tiny_nova_dir, tmp_path / "e")
    with pytest.raises(ExportError, match="not a nova-embeddings-v1 repository folder"):
        export_vllm(tmp_path / "no_repo", tmp_path / "h", task="code")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an empty folder"):
        export_vllm(tiny_nova_dir, occupied, task="code")
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]
    no_weights = tmp_path / "no_weights"
    shutil.copytree(tiny_nova_dir, no_weights)
    (no_weights / "adapters" / "code" / "adapter_model.safetensors").unlink()
    with pytest.raises(ExportError, match="no weights for task adapter 'code'"):
        export_vllm(no_weights, tmp_path / "f", task="code")
    assert main([str(tiny_nova_dir), str(tmp_path / "g"), "--task", "search"]) == 2
    assert "unknown task 'search'" in capsys.readouterr().err
    assert not any(".partial-" in p.name for p in tmp_path.iterdir())  # no staging folders left


def test_adapter_that_does_not_fit_is_refused(tiny_nova_dir, custom_adapter, tmp_path):
    bad = tmp_path / "bad_adapter"
    shutil.copytree(custom_adapter, bad)
    weights = load_file(str(bad / "adapter_model.safetensors"))
    weights["base_model.model.model.language_model.layers.99.mlp.up_proj.lora_A.weight"] = torch.ones(4, 64)
    save_file(weights, str(bad / "adapter_model.safetensors"))
    with pytest.raises(ExportError, match="1 tensors that match no layer"):
        export_vllm(tiny_nova_dir, tmp_path / "out", adapter=bad)
    assert [p.name for p in tmp_path.iterdir()] == ["bad_adapter"]


def test_client_refuses_what_the_export_cannot_serve(exports):
    client = NovaVllmClient(exports["retrieval"])
    with pytest.raises(ValueError, match=r"item 0: task 'code.query' needs the 'code' adapter"):
        client.build_prompts([{"text": "x", "task": "code.query"}])
    with pytest.raises(ValueError, match="item 0: 'adapter' cannot be chosen per item"):
        client.build_prompts([{"text": "x", "adapter": "custom"}])
    with pytest.raises(ValueError, match="pixel limits"):
        client.build_prompts([{"image": make_image(15)}], max_pixels=client.config.max_pixels * 2)
    prompts = client.build_prompts(["hello world"])
    _, states = run_like_vllm(exports["retrieval"], prompts[0])
    with pytest.raises(ValueError, match="item 0: vLLM returned states of shape"):
        client.single_vectors(prompts, [states[:-1]])
    with pytest.raises(ValueError, match="normalised them"):
        client.multi_vectors(prompts, [F.normalize(states, dim=-1)])
    with pytest.raises(ValueError, match="prompt tokens differ"):
        client.single_vectors(prompts, [states], token_ids=[[0] * len(states)])
    with pytest.raises(ValueError, match="not a nova vLLM export"):
        NovaVllmClient(exports["retrieval"] / "nova")


def test_a_failed_write_leaves_nothing_behind(tiny_nova_dir, tmp_path, monkeypatch):
    import nova_embeddings.export_vllm as export_module

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(export_module, "save_projector", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_vllm(tiny_nova_dir, tmp_path / "out", task="code")
    assert list(tmp_path.iterdir()) == []
