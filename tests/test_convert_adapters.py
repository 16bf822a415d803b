"""jina's multi-task adapter file -> one standard PEFT adapter per task, checked against jina's LoRA math.

The reference merges each task's LoRA matrices into the weights by hand (W + (alpha/r) B A on every
target, the projector included), runs stock transformers' Qwen2.5-VL the way jina does, and pools as
jina pools; the converted model must give the same vectors with its task adapters.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from test_encode import jina_image_inputs, jina_text_inputs, make_image

TASKS = ["retrieval", "text-matching", "code"]


def jina_lora(tiny_jina_dir: Path) -> tuple[dict[str, torch.Tensor], float]:
    config = json.loads((tiny_jina_dir / "adapters" / "adapter_config.json").read_text())
    tensors = load_file(str(tiny_jina_dir / "adapters" / "adapter_model.safetensors"))
    return tensors, config["lora_alpha"] / config["r"]


def merged_reference(tiny_nova_dir: Path, tiny_jina_dir: Path, task: str):
    """Stock Qwen2.5-VL plus a projector, with the task's LoRA merged by hand into every target weight."""
    config = Qwen2_5_VLConfig.from_dict(AutoConfig.from_pretrained(tiny_nova_dir, trust_remote_code=True).to_dict())
    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_nova_dir, config=config).eval()
    nova = AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True, load_task_adapters=False)
    projector = nova.multi_vector_projector
    tensors, scaling = jina_lora(tiny_jina_dir)
    modules = dict(reference.named_modules()) | {"multi_vector_projector": projector}
    merged = 0
    with torch.no_grad():
        for key, a in tensors.items():
            if not key.endswith(f".lora_A.{task}.weight"):
                continue
            module_name = key.removeprefix("base_model.model.").removesuffix(f".lora_A.{task}.weight")
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            modules[module_name].weight += scaling * (b.float() @ a.float())
            merged += 1
    assert merged == 7 * config.text_config.num_hidden_layers + 1
    return reference, projector, nova


@pytest.fixture(scope="module")
def converted(tiny_nova_dir):
    return AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True)


def test_one_standard_peft_adapter_per_task(tiny_nova_dir, tiny_jina_dir):
    tensors, _ = jina_lora(tiny_jina_dir)
    jina_config = json.loads((tiny_jina_dir / "adapters" / "adapter_config.json").read_text())
    for task in TASKS:
        folder = tiny_nova_dir / "adapters" / task
        config = json.loads((folder / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"], config["peft_type"]) == (jina_config["r"], jina_config["lora_alpha"], "LORA")
        ours = load_file(str(folder / "adapter_model.safetensors"))
        theirs = {k.replace(f".{task}.weight", ".weight"): v for k, v in tensors.items() if k.endswith(f".{task}.weight")}
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
        # Stock PEFT loads it with nothing missing or unexpected.
        base = AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True, load_task_adapters=False)
        peft_model = PeftModel.from_pretrained(base, str(folder))
        lora_params = [n for n, _ in peft_model.named_parameters() if "lora_" in n]
        assert len(lora_params) == len(ours)
        assert not any("visual" in n for n in lora_params)


@pytest.mark.parametrize("task", TASKS)
def test_converted_adapters_compute_jinas_multi_task_lora(tiny_nova_dir, tiny_jina_dir, converted, task):
    reference, projector, nova = merged_reference(tiny_nova_dir, tiny_jina_dir, task)
    tokenizer = AutoTokenizer.from_pretrained(tiny_nova_dir, trust_remote_code=True)
    prefix = "Passage: " if task != "text-matching" else "Query: "
    item_task = f"{task}.passage" if task != "text-matching" else task
    image = make_image(21)
    ours = converted.encode([{"text": "the cat sat on the mat", "task": item_task}, {"image": image, "task": item_task}])
    ours_multi = converted.encode([{"text": "the cat sat on the mat", "task": item_task}], return_multivector=True)
    with torch.no_grad():
        text_inputs = jina_text_inputs(tokenizer, prefix, "the cat sat on the mat")
        hidden = reference(**text_inputs, output_hidden_states=True).hidden_states[-1][0]
        torch.testing.assert_close(ours[0], F.normalize(hidden.mean(0), dim=-1), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(ours_multi[0], F.normalize(projector(hidden), dim=-1), atol=2e-5, rtol=1e-4)
        image_inputs = jina_image_inputs(nova, tokenizer, image)
        hidden = reference(**image_inputs, output_hidden_states=True).hidden_states[-1][0]
        ids = image_inputs["input_ids"][0]
        start = int((ids == nova.config.vision_start_token_id).nonzero()[0])
        end = int((ids == nova.config.vision_end_token_id).nonzero()[0])
        torch.testing.assert_close(ours[1], F.normalize(hidden[start : end + 1].mean(0), dim=-1), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("damage,message", [
    ("extra", "unexpected tensor base_model.model.model.visual.blocks.0.attn.qkv.lora_A.retrieval.weight"),
    ("unknown_task", "task 'search' is not one of"),
    ("missing", "task 'code': 2 LoRA tensors missing"),
    ("shape", "shape (3, 64), expected (4, 64)"),
])
def test_bad_adapter_files_are_refused_before_writing(tiny_jina_dir, tmp_path, damage, message):
    import shutil

    from nova_embeddings.convert import ConversionError, convert

    source = tmp_path / "src"
    shutil.copytree(tiny_jina_dir, source)
    path = source / "adapters" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    q_a = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A"
    if damage == "extra":
        tensors["base_model.model.model.visual.blocks.0.attn.qkv.lora_A.retrieval.weight"] = torch.zeros(4, 32)
    elif damage == "unknown_task":
        tensors[f"{q_a}.search.weight"] = tensors[f"{q_a}.code.weight"].clone()
    elif damage == "missing":
        del tensors[f"{q_a}.code.weight"], tensors[f"{q_a.replace('q_proj', 'k_proj')}.code.weight"]
    else:
        tensors[f"{q_a}.retrieval.weight"] = torch.zeros(3, 64)
    save_file(tensors, str(path))
    with pytest.raises(ConversionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        convert(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()
