"""The tiny jina checkpoint and the jina -> nova converter (nova_embeddings/tiny.py, nova_embeddings/convert.py)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLModel,
)

from nova_embeddings import convert as conv
from nova_embeddings import tiny

JINA_DROPPED = ("single_vector_pool_strategy", "truncate_dim", "processor_class", "_attn_implementation")


def load_all(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory's top-level safetensors files."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def jina_to_nova_key(key: str) -> str:
    """The key mapping the converter must apply, written out independently of it."""
    for old, new in (("model.language_model.", None), ("model.visual.", None),
                     ("model.", "model.language_model."), ("visual.", "model.visual.")):
        if key.startswith(old):
            return key if new is None else new + key[len(old):]
    return key


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def load_image_processor(directory: Path):
    """AutoImageProcessor; transformers 5.17 refuses it without torchvision (5.23 falls back to PIL), so use the PIL class."""
    try:
        return AutoImageProcessor.from_pretrained(directory)
    except ImportError:
        if importlib.util.find_spec("torchvision") is not None:
            raise
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil.from_pretrained(directory)


def broken_copy(source: Path, target: Path, edit) -> Path:
    """Copy a 5x tiny checkpoint and rewrite its weights with ``edit(tensors)``."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = load_file(str(source / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


# ------------------------------------------------------------------------------------------ tiny checkpoint


def test_tiny_checkpoint_layouts(tiny_jina_dir: Path, tiny_jina_dir_5x: Path) -> None:
    index = read_json(tiny_jina_dir / "model.safetensors.index.json")
    assert sorted(set(index["weight_map"].values())) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    keys_4x = set(load_all(tiny_jina_dir))
    assert keys_4x == set(index["weight_map"])
    assert "model.embed_tokens.weight" in keys_4x and "visual.merger.ln_q.weight" in keys_4x
    assert "multi_vector_projector.bias" in keys_4x and "lm_head.weight" not in keys_4x
    assert not any(k.startswith(("model.language_model.", "model.visual.")) for k in keys_4x)
    assert (tiny_jina_dir / "adapters" / "adapter_model.safetensors").is_file()

    assert not (tiny_jina_dir_5x / "model.safetensors.index.json").exists()
    assert not (tiny_jina_dir_5x / "adapters").exists()
    keys_5x = set(load_file(str(tiny_jina_dir_5x / "model.safetensors")))
    assert keys_5x == {jina_to_nova_key(k) for k in keys_4x}  # same seed: same tensors, other names


def test_tiny_checkpoint_runs_in_transformers(tiny_jina_dir_5x: Path) -> None:
    """transformers' own Qwen2_5_VLModel loads every tensor and runs the vision tower on a real processed image."""
    config_dict = read_json(tiny_jina_dir_5x / "config.json")
    config = Qwen2_5_VLConfig.from_dict({k: v for k, v in config_dict.items() if k != "_attn_implementation"})
    config._attn_implementation = "sdpa"
    model = Qwen2_5_VLModel(config).eval()
    weights = load_file(str(tiny_jina_dir_5x / "model.safetensors"))
    backbone = {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")}
    model.load_state_dict(backbone, strict=True)
    assert set(weights) - {f"model.{k}" for k in backbone} == {"multi_vector_projector.weight", "multi_vector_projector.bias"}

    image_processor = load_image_processor(tiny_jina_dir_5x)
    assert image_processor.size["shortest_edge"] == tiny.MIN_PIXELS
    assert image_processor.size["longest_edge"] == tiny.MAX_PIXELS
    image = Image.fromarray((np.random.RandomState(0).rand(100, 70, 3) * 255).astype("uint8"))
    pixels = image_processor(images=[image], return_tensors="pt")
    with torch.no_grad():
        out = model.visual(pixels["pixel_values"], grid_thw=pixels["image_grid_thw"])
    out = getattr(out, "pooler_output", out)  # 5.x returns the merged tokens as pooler_output
    tokens = int(pixels["image_grid_thw"].prod()) // 4
    assert 4 <= tokens <= 16
    assert out.shape == (tokens, config.text_config.hidden_size)
    assert torch.isfinite(out).all()


def test_tiny_tokenizer(tiny_jina_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_jina_dir)
    config = read_json(tiny_jina_dir / "config.json")
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    for token, field in (("<|image_pad|>", "image_token_id"), ("<|video_pad|>", "video_token_id"),
                         ("<|vision_start|>", "vision_start_token_id"), ("<|vision_end|>", "vision_end_token_id"),
                         ("<|im_end|>", "eos_token_id"), ("<|endoftext|>", "pad_token_id")):
        assert tokenizer.convert_tokens_to_ids(token) == config[field], token
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None
    ids = tokenizer("Query: hello world")["input_ids"]
    assert tokenizer.decode(ids) == "Query: hello world"
    assert len(ids) < len("Query: hello world")  # merges were learned
    assert ids == tiny.build_tiny_tokenizer().encode("Query: hello world").ids  # deterministic, same as built
    prompt = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|>\n"
    ids = tokenizer(prompt)["input_ids"]
    assert ids.count(config["image_token_id"]) == 1 and ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert len(tokenizer) <= config["text_config"]["vocab_size"]


def test_tiny_adapters(tiny_jina_dir: Path) -> None:
    adapter_config = read_json(tiny_jina_dir / "adapters" / "adapter_config.json")
    assert adapter_config["lora_alpha"] / adapter_config["r"] == 2
    assert adapter_config["exclude_modules"] == ".*visual.*" and adapter_config["peft_type"] == "LORA"
    tensors = load_file(str(tiny_jina_dir / "adapters" / "adapter_model.safetensors"))
    layers = read_json(tiny_jina_dir / "config.json")["text_config"]["num_hidden_layers"]
    assert len(tensors) == (layers * 7 + 1) * 3 * 2
    a = tensors["base_model.model.model.language_model.layers.0.self_attn.k_proj.lora_A.text-matching.weight"]
    b = tensors["base_model.model.model.language_model.layers.0.self_attn.k_proj.lora_B.text-matching.weight"]
    assert a.shape == (4, 64) and b.shape == (32, 4)
    assert tensors["base_model.model.multi_vector_projector.lora_B.code.weight"].shape == (16, 4)
    assert all(t.abs().sum() > 0 for t in tensors.values())
    assert not any("visual" in k for k in tensors)


# ------------------------------------------------------------------------------------------ conversion


@pytest.mark.parametrize("layout", ["4x", "5x"])
def test_convert_tensors_equal_source(layout: str, tiny_jina_dir: Path, tiny_jina_dir_5x: Path,
                                      tiny_nova_dir: Path, tmp_path: Path, capsys) -> None:
    """4x with index (the session fixture) and 5x without (through the CLI): every tensor carried unchanged."""
    if layout == "4x":
        source, out = tiny_jina_dir, tiny_nova_dir
    else:
        source, out = tiny_jina_dir_5x, tmp_path / "nova"
        assert conv.main(["--jina-dir", str(source), "--out", str(out)]) == 0
        assert "converted 58 tensors (float32" in capsys.readouterr().out
    converted = load_file(str(out / "model.safetensors"))
    assert not (out / "model.safetensors.index.json").exists()
    source_tensors = load_all(source)
    assert set(converted) == {jina_to_nova_key(k) for k in source_tensors}
    for key, tensor in source_tensors.items():
        assert torch.equal(converted[jina_to_nova_key(key)], tensor), key
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_converted_keys_match_transformers(tiny_nova_dir: Path) -> None:
    config = AutoConfig.from_pretrained(tiny_nova_dir, trust_remote_code=True)
    with torch.device("meta"):
        backbone = Qwen2_5_VLModel(Qwen2_5_VLConfig.from_dict(config.to_dict()))
    expected = {f"model.{k}" for k in backbone.state_dict()} | {"multi_vector_projector.weight", "multi_vector_projector.bias"}
    assert set(load_file(str(tiny_nova_dir / "model.safetensors"))) == expected


def test_converted_config(tiny_jina_dir: Path, tiny_nova_dir: Path) -> None:
    jina = read_json(tiny_jina_dir / "config.json")
    saved = read_json(tiny_nova_dir / "config.json")
    assert saved["model_type"] == "nova_embeddings_v1"
    assert saved["architectures"] == ["NovaEmbeddingsV1Model"]
    assert saved["auto_map"] == {"AutoConfig": "configuration_nova_embeddings_v1.NovaEmbeddingsV1Config",
                                 "AutoModel": "modeling_nova_embeddings_v1.NovaEmbeddingsV1Model"}
    for key in JINA_DROPPED:
        assert key not in saved, key
    assert "hidden_size" not in saved  # jina's flat text fields live in text_config only

    config = AutoConfig.from_pretrained(tiny_nova_dir, trust_remote_code=True)
    assert type(config).__name__ == "NovaEmbeddingsV1Config"
    for field in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                  "task_names", "multi_vector_projector_dim", "matryoshka_dims", "tie_word_embeddings"):
        assert getattr(config, field) == jina[field], field
    assert config.text_config.rope_parameters["mrope_section"] == [2, 3, 3]
    assert config.text_config.rope_parameters["rope_theta"] == 1e6
    assert config.text_config.hidden_size == 64 and config.text_config.num_key_value_heads == 2
    assert config.text_config.vocab_size == jina["text_config"]["vocab_size"]
    assert config.vision_config.fullatt_block_indexes == [1] and config.vision_config.window_size == 56
    assert (config.min_pixels, config.max_pixels) == (tiny.MIN_PIXELS, tiny.MAX_PIXELS)
    assert getattr(config, "_attn_implementation", None) != "flash_attention_2"


def test_converted_tokenizer(tiny_jina_dir: Path, tiny_nova_dir: Path) -> None:
    source = AutoTokenizer.from_pretrained(tiny_jina_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_nova_dir, trust_remote_code=True)
    config = AutoConfig.from_pretrained(tiny_nova_dir, trust_remote_code=True)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    text = "Query: hello world"
    assert tokenizer(text)["input_ids"] == source(text)["input_ids"]
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == config.image_token_id
    assert tokenizer.convert_tokens_to_ids("<|vision_start|>") == config.vision_start_token_id
    assert tokenizer.convert_tokens_to_ids("<|vision_end|>") == config.vision_end_token_id
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"


def test_converted_files_and_processor(tiny_nova_dir: Path, capsys) -> None:
    for name in ("configuration_nova_embeddings_v1.py", "processing_nova_embeddings_v1.py",
                 "modeling_nova_embeddings_v1.py", "chat_template.json", "tokenizer.json"):
        assert (tiny_nova_dir / name).is_file(), name
    for task in ("retrieval", "text-matching", "code"):  # jina's adapters, one PEFT adapter per task
        assert (tiny_nova_dir / "adapters" / task / "adapter_model.safetensors").is_file(), task
    assert not (tiny_nova_dir / "chat_template.jinja").exists()  # one template file
    ours = read_json(conv.REPO_ROOT / "chat_template.json")["chat_template"]
    processor_files = [n for n in ("processor_config.json", "preprocessor_config.json") if (tiny_nova_dir / n).is_file()]
    assert processor_files
    for name in processor_files:
        data = read_json(tiny_nova_dir / name)
        assert data["processor_class"] == "NovaEmbeddingsV1Processor"
        assert data["auto_map"]["AutoProcessor"] == "processing_nova_embeddings_v1.NovaEmbeddingsV1Processor"
    processor = AutoProcessor.from_pretrained(tiny_nova_dir, trust_remote_code=True)
    assert type(processor).__name__ == "NovaEmbeddingsV1Processor"
    assert processor.chat_template == ours
    assert processor.image_processor.size["longest_edge"] == tiny.MAX_PIXELS


def test_convert_bfloat16_sharded_and_adapter_note(tiny_jina_dir_5x: Path, tmp_path: Path, capsys) -> None:
    """--dtype bfloat16 with a small shard limit; a source without adapters/ gets a note saying so."""
    source = tmp_path / "src"
    shutil.copytree(tiny_jina_dir_5x, source)
    summary = conv.convert(source, tmp_path / "out", dtype="bfloat16", max_shard_bytes=100_000)
    assert summary.adapters_skipped and "has no adapters/" in capsys.readouterr().out
    # bfloat16 + a small shard limit: shards with a standard index, values = the source cast to bf16
    index = read_json(tmp_path / "out" / "model.safetensors.index.json")
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    converted = load_all(tmp_path / "out")
    assert set(converted) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in converted.values())
    for key, tensor in load_file(str(tiny_jina_dir_5x / "model.safetensors")).items():
        assert converted[key].dtype == torch.bfloat16 and torch.equal(converted[key], tensor.to(torch.bfloat16)), key
    assert read_json(tmp_path / "out" / "config.json")["dtype"] == "bfloat16"


# ------------------------------------------------------------------------------------------ errors


def test_missing_tensor_is_named(tiny_jina_dir_5x: Path, tmp_path: Path) -> None:
    name = "model.language_model.layers.1.mlp.up_proj.weight"
    source = broken_copy(tiny_jina_dir_5x, tmp_path / "src", lambda t: t.pop(name))
    with pytest.raises(conv.ConversionError, match=r"missing \(1\): " + name.replace(".", r"\.")):
        conv.convert(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_unexpected_tensor_is_named(tiny_jina_dir_5x: Path, tmp_path: Path) -> None:
    source = broken_copy(tiny_jina_dir_5x, tmp_path / "src",
                         lambda t: t.update({"single_vector_projector.weight": torch.zeros(4, 64)}))
    with pytest.raises(conv.ConversionError, match=r"unexpected \(1\): single_vector_projector\.weight"):
        conv.convert(source, tmp_path / "out")


def test_wrong_shape_is_named(tiny_jina_dir_5x: Path, tmp_path: Path) -> None:
    source = broken_copy(tiny_jina_dir_5x, tmp_path / "src",
                         lambda t: t.update({"multi_vector_projector.weight": torch.zeros(8, 64)}))
    with pytest.raises(conv.ConversionError, match=r"wrong shape \(1\): multi_vector_projector\.weight "
                                                   r"\(found \[8, 64\], expected \[16, 64\]\)"):
        conv.convert(source, tmp_path / "out")


def test_many_missing_tensors_are_counted(tiny_jina_dir_5x: Path, tmp_path: Path) -> None:
    def drop_layer(tensors: dict) -> None:
        for key in [k for k in tensors if ".layers.1." in k or ".blocks.1." in k]:
            del tensors[key]

    source = broken_copy(tiny_jina_dir_5x, tmp_path / "src", drop_layer)
    with pytest.raises(conv.ConversionError, match=r"missing \(24\): .*\.\.\. and 14 more") as error:
        conv.convert(source, tmp_path / "out")
    assert "unexpected" not in str(error.value)
    assert conv.main(["--jina-dir", str(source), "--out", str(tmp_path / "out")]) == 1  # CLI: status 1, no traceback


def test_tied_lm_head(tiny_jina_dir_5x: Path, tmp_path: Path) -> None:
    embed = "model.language_model.embed_tokens.weight"
    same = broken_copy(tiny_jina_dir_5x, tmp_path / "same", lambda t: t.update({"lm_head.weight": t[embed].clone()}))
    sources = conv.read_source_tensors(conv.find_weight_files(same))
    assert conv.drop_tied_lm_head(sources) and "lm_head.weight" not in sources
    other = broken_copy(tiny_jina_dir_5x, tmp_path / "other", lambda t: t.update({"lm_head.weight": t[embed] + 1}))
    with pytest.raises(conv.ConversionError, match="lm_head.weight differs"):
        conv.convert(other, tmp_path / "out")


def test_config_errors(tiny_jina_dir: Path, tmp_path: Path) -> None:
    jina = read_json(tiny_jina_dir / "config.json")
    preprocessor = read_json(tiny_jina_dir / "preprocessor_config.json")
    with pytest.raises(conv.ConversionError, match="single_vector_pool_strategy is 'cls'"):
        conv.build_config({**jina, "single_vector_pool_strategy": "cls"}, preprocessor)
    with pytest.raises(conv.ConversionError, match="matryoshka_dims"):
        conv.build_config({**jina, "matryoshka_dims": [16, 128]}, preprocessor)
    no_limits = {k: v for k, v in preprocessor.items() if k not in ("min_pixels", "max_pixels", "size")}
    with pytest.raises(conv.ConversionError, match="min_pixels"):
        conv.build_config(jina, no_limits)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("x")
    with pytest.raises(conv.ConversionError, match="is not empty: choose a new folder, or pass --overwrite"):
        conv.convert(tiny_jina_dir, tmp_path / "out")


def test_rename_key() -> None:
    assert conv.rename_key("model.layers.3.self_attn.q_proj.weight") == "model.language_model.layers.3.self_attn.q_proj.weight"
    assert conv.rename_key("model.embed_tokens.weight") == "model.language_model.embed_tokens.weight"
    assert conv.rename_key("visual.blocks.0.attn.qkv.bias") == "model.visual.blocks.0.attn.qkv.bias"
    assert conv.rename_key("model.visual.merger.ln_q.weight") == "model.visual.merger.ln_q.weight"
    assert conv.rename_key("model.language_model.norm.weight") == "model.language_model.norm.weight"
    assert conv.rename_key("multi_vector_projector.bias") == "multi_vector_projector.bias"


def test_full_size_jina_config_gives_known_layout() -> None:
    """jina's real sizes (reference notes): 826 tensors, 162 vision biases, the known big shapes; meta device only."""
    jina = tiny.tiny_jina_config(dtype="bfloat16")
    text = {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
            "num_attention_heads": 16, "num_key_value_heads": 2, "max_position_embeddings": 128000,
            "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"}}
    jina.update(text)
    jina["text_config"].update(text)
    jina["vision_config"].update({"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                                  "out_hidden_size": 2048, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]})
    jina.update({"multi_vector_projector_dim": 128, "matryoshka_dims": [128, 256, 512, 1024, 2048]})
    preprocessor = {**tiny.tiny_preprocessor_config(), "min_pixels": 3136, "max_pixels": 602112}
    config = conv.build_config(jina, preprocessor, torch.bfloat16)
    shapes = conv.expected_shapes(config)
    assert len(shapes) == 826
    assert sum(k.startswith("model.visual.") and k.endswith(".bias") for k in shapes) == 162
    assert shapes["model.language_model.embed_tokens.weight"] == (151936, 2048)
    assert shapes["model.language_model.layers.35.self_attn.k_proj.weight"] == (256, 2048)
    assert shapes["model.visual.patch_embed.proj.weight"] == (1280, 3, 2, 14, 14)
    assert shapes["model.visual.merger.mlp.0.weight"] == (5120, 5120)
    assert shapes["model.visual.merger.mlp.2.weight"] == (2048, 5120)
    assert shapes["multi_vector_projector.weight"] == (128, 2048)
    assert config.max_pixels == 602112 and config.text_config.rope_parameters["mrope_section"] == [16, 24, 24]


def test_make_tiny_checkpoint_cli(tmp_path: Path) -> None:
    assert tiny.main(["--out", str(tmp_path / "t"), "--layout", "5x", "--dtype", "bfloat16", "--no-adapters", "--seed", "3"]) == 0
    tensors = load_file(str(tmp_path / "t" / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert not (tmp_path / "t" / "adapters").exists()
    assert read_json(tmp_path / "t" / "config.json")["torch_dtype"] == "bfloat16"
    norm = tensors["model.language_model.norm.weight"].float()
    assert 0.8 < norm.mean() < 1.2 and norm.std() > 0.01  # norms near 1, with noise
