"""Correct by default: deterministic inference whatever state PEFT, transformers or the user left, one source of
truth for adapters (PEFT's own), and a save_pretrained that round-trips. Models are loaded exactly as the README
shows, never put in eval mode by the test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModel

from tests.helpers import make_image

TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
TEXTS = ["hello world", {"text": "def f(): pass", "task": "code.passage"}, {"text": "same", "task": "text-matching"}]


def load(path, **kwargs):
    return AutoModel.from_pretrained(path, trust_remote_code=True, **kwargs)


def jina_like_lora(seed: int = 0) -> LoraConfig:
    """jina's adapter settings (dropout 0.1), with non-zero random A and B so that any mistake shows."""
    torch.manual_seed(seed)
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS, init_lora_weights=False)


@pytest.fixture(scope="module")
def custom_adapter(tiny_nova_dir, tmp_path_factory) -> str:
    """A standard PEFT adapter folder with jina's dropout, written by stock PEFT."""
    folder = tmp_path_factory.mktemp("custom_dropout")
    get_peft_model(load(tiny_nova_dir, load_task_adapters=False), jina_like_lora(3)).save_pretrained(folder)
    return str(folder)


def items_with_image():
    return TEXTS + [{"image": make_image(1)}, {"text": "caption", "image": make_image(2), "task": "retrieval.passage"}]


def modes(model) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


def assert_repeatable(model, items):
    first = model.encode(items)
    second = model.encode(items)
    assert torch.equal(first, second)
    return first


# ---------------------------------------------------------------------- determinism
def test_encode_is_bit_identical_right_after_from_pretrained(tiny_nova_dir):
    model = load(tiny_nova_dir)
    assert not model.training
    assert_repeatable(model, items_with_image())
    multi = [model.encode(TEXTS, return_multivector=True) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*multi))


def test_encode_is_bit_identical_after_load_adapter(tiny_nova_dir, custom_adapter):
    model = load(tiny_nova_dir)
    model.load_adapter(custom_adapter, adapter_name="legal")
    assert_repeatable(model, TEXTS + [{"text": "x", "adapter": "legal"}])


def test_encode_in_train_mode_equals_eval_and_leaves_modes_as_found(tiny_nova_dir, custom_adapter):
    model = load(tiny_nova_dir)
    model.load_adapter(custom_adapter, adapter_name="legal")
    items = TEXTS + [{"text": "x", "adapter": "legal"}]
    expected = model.encode(items)
    model.train()
    model.multi_vector_projector.eval()  # a mixed state a user can reach
    before = modes(model)
    assert torch.equal(assert_repeatable(model, items), expected)
    assert modes(model) == before
    model.get_image_embeddings([make_image(3)])
    assert modes(model) == before


def test_forward_in_eval_mode_applies_no_dropout_even_if_lora_layers_train(tiny_nova_dir):
    model = load(tiny_nova_dir)
    for module in model.modules():
        if "lora_dropout" in type(module).__name__.lower() or isinstance(module, torch.nn.Dropout):
            module.train()
    model.set_adapter("retrieval")
    batch = model.processor.process_items(["hello world", "another"], config=model.config)
    with torch.no_grad():
        first, second = (model(**batch).single_vector for _ in range(2))
    assert torch.equal(first, second)


def test_encode_is_bit_identical_after_get_peft_model(tiny_nova_dir):
    """The README's training path: a base model wrapped by PEFT, whose new layers start in training mode."""
    base = load(tiny_nova_dir, load_task_adapters=False)
    bare = base.encode(TEXTS)
    peft_model = get_peft_model(base, jina_like_lora(5))
    assert peft_model.training or any(m.training for m in base.modules())  # PEFT's fresh layers train
    assert torch.equal(assert_repeatable(base, TEXTS), bare)  # default items: the bare backbone, as before
    assert torch.equal(base.encode(TEXTS, adapter=None), bare)
    assert torch.equal(base.encode(TEXTS, task="code"), bare)
    tuned = base.encode(TEXTS, adapter="default")
    assert (tuned - bare).abs().max() > 1e-3
    assert torch.equal(peft_model.encode(TEXTS, adapter="default"), tuned)


# ---------------------------------------------------------------------- one source of truth: PEFT's state
def test_peft_set_adapter_does_not_change_encode_routing(tiny_nova_dir):
    from peft.functional import set_adapter

    model = load(tiny_nova_dir)
    expected = model.encode(["query"], task="retrieval")
    set_adapter(model, "code")
    assert torch.equal(model.encode(["query"], task="retrieval"), expected)
    model.set_adapter("code")  # transformers' API on our model
    assert torch.equal(model.encode(["query"], task="retrieval"), expected)
    assert model.active_adapters() == ["code"]


def test_forward_without_adapter_names_uses_the_selected_adapter_never_a_leftover(tiny_nova_dir):
    model = load(tiny_nova_dir)
    batch = model.processor.process_items(["hello world"], config=model.config)
    bare = load(tiny_nova_dir, load_task_adapters=False)
    with torch.no_grad():
        expected_bare = bare(**batch).single_vector
        assert model.active_adapters() == []
        torch.testing.assert_close(model(**batch).single_vector, expected_bare)
        model.encode(["anything"], task="code")  # leaves nothing behind
        torch.testing.assert_close(model(**batch).single_vector, expected_bare)
        model.set_adapter("code")
        code = model(**batch).single_vector
        torch.testing.assert_close(code, model.encode(["hello world"], adapter="code"))
        model.encode(["x"], adapter=None)
        torch.testing.assert_close(model(**batch).single_vector, code)  # still the selected one
        routed = model(**batch, adapter_names=["text-matching"]).single_vector  # explicit rows win
        torch.testing.assert_close(routed, model.encode(["hello world"], adapter="text-matching"))
        model.disable_adapters()
        torch.testing.assert_close(model(**batch).single_vector, expected_bare)
        with pytest.raises(ValueError, match="unknown adapter"):
            model(**batch, adapter_names=["nope"])


def test_merge_and_unload_is_refused_clearly(tiny_nova_dir):
    model = load(tiny_nova_dir)
    peft_model = PeftModel(model, model.peft_config["retrieval"], adapter_name="retrieval")
    merged = peft_model.merge_and_unload()
    assert merged.list_adapters() == []
    with pytest.raises(RuntimeError, match="merged into the weights and unloaded"):
        merged.encode(["x"], task="code")


@pytest.mark.parametrize("reinject", ["load_adapter", "get_peft_model"])
def test_merged_and_unloaded_weights_stay_refused_when_adapters_are_added_again(tiny_nova_dir, custom_adapter,
                                                                                 reinject):
    """merge_and_unload leaves an adapter inside the base weights: adapters added afterwards (ours or PEFT's) would
    wrap those weights again and encode would run every item on them, as if they were the bare backbone."""
    model = load(tiny_nova_dir)
    PeftModel(model, model.peft_config["retrieval"], adapter_name="retrieval").merge_and_unload()
    if reinject == "load_adapter":
        with pytest.raises(ValueError, match="merged into the weights and unloaded"):
            model.load_adapter(custom_adapter, adapter_name="legal")
        assert model.list_adapters() == []
    else:
        every_projection = f"{TARGETS}|.*multi_vector_projector$"  # wraps every projection that lost its layer
        get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=every_projection, init_lora_weights=False))
    with pytest.raises(RuntimeError, match="merged into the weights and unloaded"):
        model.encode(["x"])


def test_peft_merge_adapter_is_refused_clearly(tiny_nova_dir):
    from peft.tuners.lora.layer import LoraLayer

    model = load(tiny_nova_dir)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.merge(adapter_names=["code"])
    with pytest.raises(RuntimeError, match=r"\['code'\] are merged into the base weights"):
        model.encode(["x"])


def test_peft_model_from_pretrained_adds_a_routable_adapter(tiny_nova_dir):
    model = load(tiny_nova_dir)
    code = model.encode(["x"], task="code")
    peft_model = PeftModel.from_pretrained(model, str(Path(tiny_nova_dir) / "adapters" / "code"))
    assert "default" in model.list_adapters()
    torch.testing.assert_close(model.encode(["x"], adapter="default"), code)
    torch.testing.assert_close(peft_model.encode(["x"], task="code"), code)


def test_transformers_adapter_api_works_on_peft_we_support(tiny_nova_dir, custom_adapter):
    model = load(tiny_nova_dir)
    model.add_adapter(jina_like_lora(9), adapter_name="fresh")
    assert "fresh" in model.list_adapters()
    state = model.get_adapter_state_dict("fresh")
    assert state and all("lora_" in key for key in state)
    model.delete_adapter("fresh")
    assert "fresh" not in model.list_adapters()
    model.load_adapter(custom_adapter, adapter_name="legal")
    model.set_adapter("legal")
    assert model.active_adapters() == ["legal"]
    model.disable_adapters()
    assert model.active_adapters() == []
    model.enable_adapters()
    assert model.active_adapters() == ["legal"]
    with pytest.raises(ValueError, match="unknown adapter"):
        model.set_adapter("nope")


def test_adapters_removed_through_peft_disappear(tiny_nova_dir, custom_adapter):
    from peft.functional import delete_adapter

    model = load(tiny_nova_dir)
    model.load_adapter(custom_adapter, adapter_name="legal")
    delete_adapter(model, adapter_name="legal", prefix="lora_")
    assert "legal" not in model.list_adapters()
    with pytest.raises(ValueError, match="unknown adapter 'legal'"):
        model.encode(["x"], adapter="legal")


# ---------------------------------------------------------------------- custom adapters on a base model
def test_custom_adapter_on_a_base_model_keeps_defaults_on_the_backbone(tiny_nova_dir, custom_adapter):
    model = load(tiny_nova_dir, load_task_adapters=False)
    before = model.encode(TEXTS)
    model.load_adapter(custom_adapter, adapter_name="legal")
    assert torch.equal(model.encode(TEXTS), before)
    assert (model.encode(TEXTS, adapter="legal") - before).abs().max() > 1e-3
    assert model.custom_adapters() == ["legal"]


def test_a_task_name_needs_an_explicit_opt_in_and_can_be_unloaded(tiny_nova_dir, custom_adapter):
    model = load(tiny_nova_dir, load_task_adapters=False)
    bare = model.encode(["q"])
    with pytest.raises(ValueError, match="is a task name"):
        model.load_adapter(custom_adapter, adapter_name="retrieval")
    model.load_adapter(custom_adapter, adapter_name="retrieval", as_task_adapter=True)
    assert (model.encode(["q"]) - bare).abs().max() > 1e-3  # retrieval items now route to it
    model.unload_adapter("retrieval")
    assert model.list_adapters() == []
    assert torch.equal(model.encode(["q"]), bare)


def test_unloading_a_task_adapter_refuses_its_items_while_others_remain(tiny_nova_dir):
    model = load(tiny_nova_dir)
    model.unload_adapter("code")
    with pytest.raises(ValueError, match="item 0: task 'code' routes to adapter 'code', which is not loaded"):
        model.encode([{"text": "x", "task": "code"}])
    model.encode(["still fine"])


# ---------------------------------------------------------------------- empty input
@pytest.mark.parametrize("output", ["torch", "numpy", "list", "base64"])
def test_encoding_nothing_returns_an_empty_result_of_the_right_shape(tiny_nova_dir, output):
    model = load(tiny_nova_dir)
    width = model.config.embedding_dim
    empty = model.encode([], output=output)
    if output == "torch":
        assert isinstance(empty, torch.Tensor) and empty.shape == (0, width)
    elif output == "numpy":
        assert isinstance(empty, np.ndarray) and empty.shape == (0, width)
    else:
        assert empty == []
    smallest = model.config.matryoshka_dims[0]
    assert model.encode([], dimensions=smallest).shape == (0, smallest)
    assert model.encode([], return_multivector=True) == []


# ---------------------------------------------------------------------- save_pretrained round trip
def encode_everything(model) -> list[torch.Tensor]:
    outputs = [model.encode(items_with_image())]
    for name in model.list_adapters() + [None]:
        outputs.append(model.encode(items_with_image(), adapter=name))
        outputs.extend(model.encode(items_with_image(), adapter=name, return_multivector=True))
    return outputs


def test_save_pretrained_round_trips_bit_identically(tiny_nova_dir, custom_adapter, tmp_path):
    model = load(tiny_nova_dir)
    model.load_adapter(custom_adapter, adapter_name="legal")
    expected = encode_everything(model)
    model.save_pretrained(tmp_path / "saved")

    saved = tmp_path / "saved"
    weights = json.loads((saved / "config.json").read_text())
    assert weights["auto_map"]["AutoModel"].endswith("NovaEmbeddingsV1Model")
    for needed in ("modeling_nova_embeddings_v1.py", "configuration_nova_embeddings_v1.py",
                   "processing_nova_embeddings_v1.py", "adapters_nova_embeddings_v1.py", "tokenizer.json"):
        assert (saved / needed).is_file(), needed
    from safetensors import safe_open

    keys = set()
    for file in saved.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            keys |= set(handle.keys())
    assert keys and not any("base_layer" in k or "lora_" in k for k in keys)
    for name in ["retrieval", "text-matching", "code", "legal"]:
        assert (saved / "adapters" / name / "adapter_model.safetensors").is_file()
        assert json.loads((saved / "adapters" / name / "adapter_config.json").read_text())["lora_dropout"] == 0.1

    fresh = tmp_path / "fresh copy"  # a new path: the remote code is loaded anew from the saved files alone
    shutil.copytree(saved, fresh)
    reloaded = load(fresh)
    assert reloaded.list_adapters() == model.list_adapters()
    got = encode_everything(reloaded)
    assert len(got) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_saved_adapters_load_in_stock_peft(tiny_nova_dir, tmp_path):
    model = load(tiny_nova_dir)
    model.save_pretrained(tmp_path / "saved")
    expected = model.encode(["x"], task="code")
    base = load(tmp_path / "saved", load_task_adapters=False)
    PeftModel.from_pretrained(base, str(tmp_path / "saved" / "adapters" / "code"), adapter_name="code-copy")
    torch.testing.assert_close(base.encode(["x"], adapter="code-copy"), expected)


def test_save_pretrained_asks_the_hub_nothing(tiny_nova_dir, tmp_path, monkeypatch):
    """Saving writes local files only: PEFT's check for a resized vocabulary (a Hub lookup of the adapters'
    base_model_name_or_path, a warning when offline) does not apply, the base weights being saved beside them."""
    import peft.utils.save_and_load as peft_saving

    def no_hub(repo_id, filename, *args, **kwargs):
        raise AssertionError(f"save_pretrained looked up {filename} of {repo_id!r} on the Hub")

    monkeypatch.setattr(peft_saving, "check_file_exists_on_hf_hub", no_hub)
    model = load(tiny_nova_dir)
    model.save_pretrained(tmp_path / "saved")
    assert load(tmp_path / "saved").list_adapters() == model.list_adapters()


def test_save_after_training_a_custom_adapter(tiny_nova_dir, tmp_path):
    base = load(tiny_nova_dir, load_task_adapters=False)
    peft_model = get_peft_model(base, jina_like_lora(11))
    peft_model.train()
    batch = base.processor.process_items(["train me", "and me"], config=base.config)
    loss = peft_model(**batch).single_vector.sum()
    loss.backward()
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if parameter.grad is not None:
                parameter -= 0.1 * parameter.grad
    expected = base.encode(TEXTS, adapter="default")
    base.save_pretrained(tmp_path / "trained")
    reloaded = load(tmp_path / "trained")
    assert reloaded.list_adapters() == ["default"]
    assert torch.equal(reloaded.encode(TEXTS, adapter="default"), expected)


def test_an_adapter_with_nan_weights_is_refused_and_changes_nothing(tiny_nova_dir, custom_adapter, tmp_path):
    from safetensors.torch import load_file, save_file

    model = load(tiny_nova_dir)
    before = model.encode(TEXTS)
    broken = tmp_path / "nan"
    shutil.copytree(custom_adapter, broken)
    state = load_file(str(broken / "adapter_model.safetensors"))
    first = next(iter(state))
    state[first][0, 0] = float("nan")
    save_file(state, str(broken / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=f"tensor '{first}' holds NaN or infinite values"):
        model.load_adapter(broken, adapter_name="broken")
    assert "broken" not in model.list_adapters()
    assert torch.equal(model.encode(TEXTS), before)
