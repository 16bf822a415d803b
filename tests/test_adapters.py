"""Per-item adapter routing, runtime load/unload, and thread safety, with real PEFT LoRA adapters."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModel
from peft.tuners.lora.layer import LoraLayer

BASE = "__base__"  # the bare backbone in adapter_names (PEFT's name)

TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$|.*multi_vector_projector$"
ITEMS = ["hello world", {"text": "def f(): pass", "task": "code.passage"}, {"text": "same meaning", "task": "text-matching"},
         {"text": "custom", "adapter": "custom"}, {"text": "bare", "adapter": None}, {"text": "a passage", "task": "retrieval.passage"}]


def load(tiny_nova_dir, **kwargs):
    return AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True, **kwargs)


def write_random_adapter(tiny_nova_dir, folder, seed: int, rank: int = 4, targets: str = TARGETS) -> str:
    """A standard PEFT LoRA adapter with random, non-zero A and B, saved by stock PEFT."""
    torch.manual_seed(seed)
    base = load(tiny_nova_dir, load_task_adapters=False)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(base, config)
    peft_model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def custom_adapter(tiny_nova_dir, tmp_path_factory):
    return write_random_adapter(tiny_nova_dir, tmp_path_factory.mktemp("custom"), seed=7)


@pytest.fixture()
def model(tiny_nova_dir, custom_adapter):
    model = load(tiny_nova_dir)
    model.load_adapter(custom_adapter, adapter_name="custom")
    return model


def test_task_adapters_load_with_the_model(model):
    assert model.list_adapters() == ["retrieval", "text-matching", "code", "custom"]


def test_mixed_call_equals_each_item_alone(model):
    together = model.encode(ITEMS)
    alone = torch.stack([model.encode([item])[0] for item in ITEMS])
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=1e-5)
    model.adapter_batching = "mixed"
    torch.testing.assert_close(model.encode(ITEMS), together, atol=1e-6, rtol=1e-5)
    model.attention_packing = "on"  # packed rows carry one adapter each
    torch.testing.assert_close(model.encode(ITEMS), together, atol=1e-5, rtol=1e-4)
    model.attention_packing = "auto"
    multi = model.encode(ITEMS, return_multivector=True)
    for got, item in zip(multi, ITEMS):
        torch.testing.assert_close(got, model.encode([item], return_multivector=True)[0], atol=1e-6, rtol=1e-5)


def test_each_adapter_changes_the_output(model):
    outputs = {name: model.encode(["hello world"], adapter=name)[0] for name in model.list_adapters() + [None]}
    names = list(outputs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert (outputs[a] - outputs[b]).abs().max() > 1e-4, (a, b)
    torch.testing.assert_close(model.encode(["hello world"])[0], outputs["retrieval"])
    torch.testing.assert_close(model.encode([{"text": "x", "task": "code"}])[0], model.encode(["x"], adapter="code")[0])


def test_peft_mixed_batch_reproduces_each_adapter(tiny_nova_dir, custom_adapter):
    """The PEFT mechanism we route with: a PeftModel in eval mode with adapter_names per row."""
    base = load(tiny_nova_dir, load_task_adapters=False)
    peft_model = PeftModel.from_pretrained(base, custom_adapter, adapter_name="a")
    other = write_random_adapter(tiny_nova_dir, f"{custom_adapter}-b", seed=8)
    peft_model.load_adapter(other, adapter_name="b")
    peft_model.eval()
    batch = base.processor.process_items(["hello world", "hello world", "hello world"], config=base.config)
    with torch.no_grad():
        mixed = peft_model(**batch, adapter_names=["a", "b", "__base__"]).single_vector
        expected = []
        for name in ("a", "b"):
            peft_model.set_adapter(name)
            expected.append(peft_model(**batch).single_vector[0])
        with peft_model.disable_adapter():
            expected.append(peft_model(**batch).single_vector[0])
    torch.testing.assert_close(mixed, torch.stack(expected), atol=1e-6, rtol=1e-5)


def test_unknown_and_unloaded_adapters_are_errors(model):
    with pytest.raises(ValueError, match=r"item 1: unknown adapter 'nope'; loaded adapters: \['retrieval'"):
        model.encode(["ok", {"text": "x", "adapter": "nope"}])
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        model.encode(["ok"], adapter="nope")
    model.unload_adapter("custom")
    assert "custom" not in model.list_adapters()
    with pytest.raises(ValueError, match="item 0: unknown adapter 'custom'"):
        model.encode([{"text": "x", "adapter": "custom"}])
    with pytest.raises(ValueError, match="no adapter named 'ghost'"):
        model.unload_adapter("ghost")


def snapshot(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("problem", ["bad_path", "wrong_rank", "wrong_targets", "name_clash", "not_lora_file"])
def test_failed_load_leaves_adapters_as_they_were(model, tiny_nova_dir, tmp_path, problem):
    before_state, before_names = snapshot(model), model.list_adapters()
    before = model.encode(ITEMS)
    name = "new"
    if problem == "bad_path":
        source, match = str(tmp_path / "missing"), "no such adapter folder"
    elif problem == "wrong_rank":
        source = write_random_adapter(tiny_nova_dir, tmp_path / "r8", seed=9, rank=8)
        config = json.loads((tmp_path / "r8" / "adapter_config.json").read_text())
        config["r"] = 4
        (tmp_path / "r8" / "adapter_config.json").write_text(json.dumps(config))
        match = "size mismatch"
    elif problem == "wrong_targets":
        source = write_random_adapter(tiny_nova_dir, tmp_path / "t", seed=10)
        config = json.loads((tmp_path / "t" / "adapter_config.json").read_text())
        config["target_modules"] = ["no_such_module"]
        (tmp_path / "t" / "adapter_config.json").write_text(json.dumps(config))
        match = "could not load adapter 'new'"
    elif problem == "name_clash":
        source, name, match = write_random_adapter(tiny_nova_dir, tmp_path / "c", seed=11), "custom", "already loaded"
    else:
        source = tmp_path / "notlora"
        source.mkdir()
        (source / "adapter_config.json").write_text("{}")
        (source / "adapter_model.safetensors").write_bytes(b"junk")
        match = "only LoRA adapters are supported"
    with pytest.raises((ValueError, OSError), match=match):
        model.load_adapter(source, adapter_name=name)
    after_state = model.state_dict()
    assert model.list_adapters() == before_names
    assert before_state.keys() == after_state.keys()
    assert all(torch.equal(before_state[k], after_state[k]) for k in before_state)
    torch.testing.assert_close(model.encode(ITEMS), before)


def test_loading_a_weights_file_path_works(model, custom_adapter):
    model.load_adapter(f"{custom_adapter}/adapter_model.safetensors", adapter_name="again")
    torch.testing.assert_close(model.encode(["x"], adapter="again"), model.encode(["x"], adapter="custom"))


@pytest.mark.parametrize("batching", ["group", "mixed, fused"])
def test_encoding_is_safe_while_adapters_change(model, tiny_nova_dir, tmp_path, batching, monkeypatch):
    """Encode in threads while another thread loads and unloads: every result equals the serial one (also in fused
    stacked passes, whose shared inputs and rank tables follow the adapters loaded at each call)."""
    if batching != "group":
        model.adapter_batching, model.attention_packing = "mixed", "on"
        monkeypatch.setattr(adapters_module(model), "FUSED_MIN_TOKENS", 1)
    extra = write_random_adapter(tiny_nova_dir, tmp_path / "extra", seed=12)
    items = ITEMS[:3] + [ITEMS[4]]
    expected = model.encode(items)
    errors, results = [], []

    def encode_many():
        try:
            for _ in range(6):
                results.append(model.encode(items, batch_size=2))
        except Exception as error:  # collected and asserted below
            errors.append(error)

    def churn():
        try:
            for i in range(6):
                model.load_adapter(extra, adapter_name=f"extra{i}")
                model.unload_adapter(f"extra{i}")
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=encode_many) for _ in range(2)] + [threading.Thread(target=churn)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(results) == 12
    for result in results:  # (a stacked pass multiplies a loaded extra adapter's ranks by zeros: rounding only)
        torch.testing.assert_close(result, expected, atol=1e-6 if batching == "group" else 1e-5,
                                   rtol=1e-5 if batching == "group" else 1e-4)


def test_merged_adapter_groups_equal_unmerged_and_restore_weights_exactly(model):
    """adapter_merging="on": each adapter group runs on merged weights (PEFT's merge), originals put back: the
    same values in the same memory (CUDA graphs captured before read the weights there)."""
    before = snapshot(model)
    pointers = {name: p.data_ptr() for name, p in model.named_parameters()}
    model.adapter_merging = "off"
    unmerged = model.encode(ITEMS)
    unmerged_multi = model.encode(ITEMS, return_multivector=True)
    model.adapter_merging = "on"
    for packing in ("off", "on"):
        model.attention_packing = packing
        torch.testing.assert_close(model.encode(ITEMS, batch_size=2), unmerged, atol=1e-5, rtol=1e-4)
        for got, want in zip(model.encode(ITEMS, return_multivector=True), unmerged_multi):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert pointers == {name: p.data_ptr() for name, p in model.named_parameters()}
    assert not any(m.merged_adapters for m in model.modules() if isinstance(m, LoraLayer))
    model.adapter_merging, model.attention_packing = "auto", "auto"



def test_a_separately_loaded_processor_routes_the_same(model, tiny_nova_dir):
    """AutoProcessor may come from another copy of the remote-code modules: routing must not depend on identity."""
    from transformers import AutoProcessor

    expected = model.encode(ITEMS)
    model.processor = AutoProcessor.from_pretrained(tiny_nova_dir, trust_remote_code=True)
    torch.testing.assert_close(model.encode(ITEMS), expected)


def test_fast_merge_adds_what_peft_merge_adds(model):
    """The one-addmm_ merge of a plain LoRA layer gives PEFT's merged weight (W + its get_delta_weight)."""
    manager = model.adapter_manager
    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and "retrieval" in m.lora_A]
    originals = {layer: layer.get_base_layer().weight.detach().clone() for layer in layers}
    deltas = {layer: layer.get_delta_weight("retrieval").detach().clone() for layer in layers}
    try:
        manager.merge("retrieval", layers)
        for layer in layers:
            assert layer.merged_adapters == ["retrieval"]
            torch.testing.assert_close(layer.get_base_layer().weight, originals[layer] + deltas[layer], atol=1e-6, rtol=1e-5)
    finally:
        manager.restore_merged()
    assert all(torch.equal(layer.get_base_layer().weight, originals[layer]) for layer in layers)


@pytest.fixture()
def peft_mixed_forward_calls(monkeypatch):
    """Counts calls of PEFT's per-adapter mixed-batch loop (which the stacked pass replaces at inference)."""
    from peft.tuners.lora.layer import Linear

    calls, original = [], Linear._mixed_batch_forward

    def counting(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Linear, "_mixed_batch_forward", counting)
    return calls


@pytest.mark.parametrize("packing", ["on", "off"])
def test_mixed_batches_run_every_adapter_in_one_stacked_pass(model, packing, peft_mixed_forward_calls):
    """adapter_batching="mixed": one forward pass holds items of every adapter (packed rows too), each LoRA layer
    adds all their deltas in one stacked computation, and every vector equals its item encoded alone."""
    alone = torch.stack([model.encode([item])[0] for item in ITEMS])
    model.adapter_batching, model.attention_packing = "mixed", packing
    passes = []
    handle = model.register_forward_pre_hook(lambda module, args: passes.append(1))
    together = model.encode(ITEMS)
    handle.remove()
    assert len(passes) == 1 and not peft_mixed_forward_calls
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
    model.train()  # encode never applies dropout: the same single pass, the same vectors
    torch.testing.assert_close(model.encode(ITEMS), together, rtol=0, atol=0)
    assert not peft_mixed_forward_calls and model.training
    multi = model.encode(ITEMS, return_multivector=True)
    for got, item in zip(multi, ITEMS):
        torch.testing.assert_close(got, model.encode([item], return_multivector=True)[0], atol=1e-5, rtol=1e-4)


def test_forward_with_adapter_names_in_training_uses_peft_per_adapter_dropout(model, peft_mixed_forward_calls):
    """Training through forward(adapter_names=...) keeps PEFT's mixed-batch forward: each adapter's own dropout
    and gradients to its weights (the stacked pass is for inference only)."""
    batch = model.processor.process_items(["one", "two"], config=model.config)
    for name, parameter in model.named_parameters():  # what a training script does with the adapters it trains
        parameter.requires_grad_(".lora_" in name)
    model.train()
    out = model(**batch, adapter_names=["retrieval", "code"]).single_vector
    out.sum().backward()
    assert peft_mixed_forward_calls
    assert any(layer.lora_A["code"].weight.grad is not None for layer in model.modules() if isinstance(layer, LoraLayer)
               and "code" in layer.lora_A)


def test_adapters_that_cannot_stack_fall_back_to_exact_per_adapter_batches(tiny_nova_dir, tmp_path):
    """A DoRA adapter is not a plain LoRA: mixed packed calls group its items instead; results stay exact."""
    torch.manual_seed(3)
    base = load(tiny_nova_dir, load_task_adapters=False)
    dora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True,
                                           init_lora_weights=False))
    dora.save_pretrained(tmp_path / "dora")
    model = load(tiny_nova_dir)
    model.load_adapter(str(tmp_path / "dora"), adapter_name="dora")
    items = ITEMS[:3] + [{"text": "dora item", "adapter": "dora"}]
    alone = torch.stack([model.encode([item])[0] for item in items])
    model.adapter_batching, model.attention_packing = "mixed", "on"
    torch.testing.assert_close(model.encode(items), alone, atol=1e-5, rtol=1e-4)


def test_only_plain_lora_on_the_language_model_stacks(tiny_nova_dir, tmp_path):
    """Each condition a stacked pass needs, one adapter breaking each: DoRA, a LoRA bias, the vision tower's layers,
    an A weight in another dtype than its projection; dropout in training mode unless the pass disables it; no
    adapter while gradients are on."""
    def saved(name, **config):
        torch.manual_seed(len(name))
        base = load(tiny_nova_dir, load_task_adapters=False)
        config.setdefault("target_modules", TARGETS)
        lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **config)
        get_peft_model(base, lora).save_pretrained(tmp_path / name)
        return str(tmp_path / name)

    model = load(tiny_nova_dir)
    module = adapters_module(model)
    model.load_adapter(saved("plain"), adapter_name="plain")
    model.load_adapter(saved("cast"), adapter_name="cast")
    model.load_adapter(saved("dora", use_dora=True), adapter_name="dora")
    model.load_adapter(saved("biased", target_modules=r".*language_model.*\.(q|k|v)_proj$", lora_bias=True),
                       adapter_name="biased")
    model.load_adapter(saved("vision", target_modules=r".*visual.*\.qkv$"), adapter_name="vision")  # Linear layers
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer) and "cast" in m.lora_A)
    layer.lora_A["cast"].weight.data = layer.lora_A["cast"].weight.data.double()
    plain = sorted(["retrieval", "text-matching", "code", "plain"])
    with torch.no_grad():
        assert module.stackable_adapters(model, dropout_disabled=True) == plain
        assert module.stackable_adapters(model) == plain  # from_pretrained leaves the model in eval mode
        model.train()  # the task adapters' dropout (0.1, jina's config) is active now; "plain" has none
        assert module.stackable_adapters(model) == ["plain"]
        assert module.stackable_adapters(model, dropout_disabled=True) == plain
        assert module.can_stack(model, ["plain", "code"], dropout_disabled=True)
        assert not module.can_stack(model, ["plain", "dora"], dropout_disabled=True)
    assert module.stackable_adapters(model, dropout_disabled=True) == []  # gradients on: PEFT's forward trains


def test_merging_an_adapter_peft_merges_in_place_restores_the_original_weights(tiny_nova_dir, tmp_path):
    """A LoRA with a bias is not a plain LoRA: merged groups go through PEFT's merge, which adds into the weight and
    the base bias in place; it runs on copies, and the original weights and biases come back exactly, where they
    were (the biases were once left merged, so every later group and call ran on them)."""
    torch.manual_seed(4)
    base = load(tiny_nova_dir, load_task_adapters=False)
    biased = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q|k|v)_proj$",
                                             lora_bias=True, init_lora_weights=False))  # (the projections with a bias)
    biased.save_pretrained(tmp_path / "biased")
    model = load(tiny_nova_dir)
    model.load_adapter(str(tmp_path / "biased"), adapter_name="biased")
    items = ITEMS[:3] + [{"text": "biased item", "adapter": "biased"}]
    alone = torch.stack([model.encode([item])[0] for item in items])
    before = snapshot(model)
    pointers = {name: p.data_ptr() for name, p in model.named_parameters()}
    merges = []
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer) and "biased" in m.lora_A)
    layer.merge = lambda *args, **kwargs: (merges.append(1), type(layer).merge(layer, *args, **kwargs))[1]
    model.adapter_merging = "on"
    torch.testing.assert_close(model.encode(items), alone, atol=1e-5, rtol=1e-4)
    assert merges  # PEFT's own merge ran
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert pointers == {name: p.data_ptr() for name, p in model.named_parameters()}


def test_stacked_pass_inside_compiled_blocks_equals_each_item_alone(model):
    """The stacked deltas are added by a hook inside each decoder block: traced by torch.compile with the block."""
    alone = torch.stack([model.encode([item])[0] for item in ITEMS])
    model.adapter_batching, model.attention_packing = "mixed", "on"
    model.compile_layers(backend="eager", vision=False)
    for _ in range(2):  # the second call runs what the first compiled
        torch.testing.assert_close(model.encode(ITEMS), alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.encode(ITEMS[::-1]), alone.flip(0), atol=1e-5, rtol=1e-4)


def test_every_adapter_state_of_compiled_blocks_stays_compiled(model):
    """Each adapter state a call puts the blocks in (no adapter, each adapter unmerged or merged, stacked passes;
    packed or padded; single or multi vectors) compiles its own variant of a block: more than dynamo's default limit
    of 8, past which it silently runs every new state eagerly. None may hit the limit, and each equals eager."""
    import logging

    eager = {key: model.encode(ITEMS, return_multivector=key) for key in (False, True)}
    limit_hits: list[str] = []

    class Recorder(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "recompile_limit" in record.getMessage():
                limit_hits.append(record.getMessage())

    recorder = Recorder()
    logging.getLogger("torch._dynamo").addHandler(recorder)
    try:
        model.compile_layers(backend="eager", vision=False)
        for merging in ("off", "on"):
            for packing in ("off", "on"):
                for batching in ("group", "mixed"):
                    model.adapter_merging, model.attention_packing, model.adapter_batching = merging, packing, batching
                    for multi in (False, True):
                        got = model.encode(ITEMS, return_multivector=multi)
                        for mine, theirs in zip(got, eager[multi]):
                            torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4)
    finally:
        logging.getLogger("torch._dynamo").removeHandler(recorder)
    assert limit_hits == []


def adapters_module(model):
    """The remote-code copy of adapters_nova_embeddings_v1 this model runs on."""
    import importlib

    return importlib.import_module(type(model).__module__.rsplit(".", 1)[0] + ".adapters_nova_embeddings_v1")


def fused_layers_seen(model) -> tuple[set[str], list]:
    """Records which LoRA layers ran a fused forward (their instance ``forward`` replaced) during each pass."""
    seen: set[str] = set()
    handles = []
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer) and "language_model" in name:
            record = lambda module, args, output, name=name: seen.add(name.rsplit(".", 1)[-1]) \
                if "forward" in module.__dict__ else None  # noqa: E731
            handles.append(layer.register_forward_hook(record))
    return seen, handles


@pytest.mark.parametrize("packing", ["on", "off"])
def test_large_stacked_passes_fuse_the_deltas_into_the_projections(model, packing, monkeypatch):
    """From FUSED_MIN_TOKENS on, a mixed pass computes the projections whose input is no wider than their output
    or FUSED_MAX_INPUT as one GEMM over [x, ranks] and [W, B] (no delta tensor written and added); the others add
    the delta. Vectors equal the unfused pass and each item alone, in eval and train mode, padded and packed, and
    every layer's forward is PEFT's again after the call."""
    model.adapter_batching, model.attention_packing = "mixed", packing
    unfused = model.encode(ITEMS)
    monkeypatch.setattr(adapters_module(model), "FUSED_MIN_TOKENS", 1)
    monkeypatch.setattr(adapters_module(model), "FUSED_MAX_INPUT", model.config.text_config.hidden_size)
    seen, handles = fused_layers_seen(model)
    fused = model.encode(ITEMS)
    assert seen == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"}  # not down: intermediate -> hidden
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=1e-4)
    alone = torch.stack([model.encode([item])[0] for item in ITEMS])
    torch.testing.assert_close(fused, alone, atol=1e-5, rtol=1e-4)
    model.train()
    torch.testing.assert_close(model.encode(ITEMS), fused, atol=0, rtol=0)
    for handle in handles:
        handle.remove()
    assert not any("forward" in layer.__dict__ for layer in model.modules() if isinstance(layer, LoraLayer))
    wrong = model.encode(ITEMS, adapter="code")  # a wrong adapter shows
    assert (wrong - fused).abs().max() > 1e-3


def test_fused_pass_inside_compiled_blocks(model, monkeypatch):
    """Dynamo traces the fused projections with each decoder block; fused and unfused passes, and other mixes of
    adapters, each run their compiled variant with the same vectors as eager."""
    model.adapter_batching, model.attention_packing = "mixed", "on"
    monkeypatch.setattr(adapters_module(model), "FUSED_MIN_TOKENS", 1)
    eager = model.encode(ITEMS)
    model.compile_layers(backend="eager", vision=False)
    for _ in range(2):
        torch.testing.assert_close(model.encode(ITEMS), eager, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.encode(ITEMS[1:4]), eager[1:4], atol=1e-5, rtol=1e-4)
    monkeypatch.setattr(adapters_module(model), "FUSED_MIN_TOKENS", 10**9)
    torch.testing.assert_close(model.encode(ITEMS), eager, atol=1e-5, rtol=1e-4)


def test_fused_siblings_read_one_shared_input(model, tiny_nova_dir, tmp_path, monkeypatch):
    """In a fused pass an attention's q, k and v read views of one [r_q, x, r_k, r_v] buffer, an MLP's gate and up of
    one [r_g, x, r_u], each built once per module call and let go when its last sibling has run. Vectors equal the
    unfused pass's and each item's alone, also with an adapter on some siblings only (unequal rank widths, so v reads
    k's ranks through zero weights) and when one sibling gets another input tensor than the others."""
    module = adapters_module(model)
    partial = write_random_adapter(tiny_nova_dir, tmp_path / "partial", seed=11, rank=3,
                                   targets=r".*language_model.*\.(q_proj|v_proj|up_proj)$")
    model.load_adapter(partial, adapter_name="partial")
    items = ITEMS + [{"text": "partial adapter", "adapter": "partial"}, {"text": "and again", "adapter": "partial"}]
    model.adapter_batching, model.attention_packing = "mixed", "on"
    unfused = model.encode(items)
    monkeypatch.setattr(module, "FUSED_MIN_TOKENS", 1)
    builds, released = [], []
    build = module._build_shared_input

    def counted_build(shared, x):
        builds.append(shared.widths)
        return build(shared, x)

    monkeypatch.setattr(module, "_build_shared_input", counted_build)
    blocks = model.model.language_model.layers


    def check(block, args, output):
        passes = [getattr(layer, module.STACKED_PASS) for layer in (block.self_attn.q_proj, block.mlp.gate_proj)]
        released.extend(routing.shared.buffer for routing in passes if routing is not None)

    handles = [block.register_forward_hook(check) for block in blocks]
    fused = model.encode(items)
    assert builds and len(builds) % (2 * len(blocks)) == 0
    widths = {len(widths): widths for widths in builds}
    assert widths[3][1] < widths[3][2] and widths[2][0] < widths[2][1]  # "partial" holds q, v and up, not k and gate
    assert len(released) == len(builds) and all(buffer is None for buffer in released)
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=1e-4)
    alone = torch.stack([model.encode([item])[0] for item in items])
    torch.testing.assert_close(fused, alone, atol=1e-5, rtol=1e-4)
    for handle in handles:
        handle.remove()
    other_input = blocks[0].self_attn.k_proj.register_forward_pre_hook(lambda layer, args: (args[0].clone(),))
    builds.clear()
    torch.testing.assert_close(model.encode(items), fused, atol=1e-5, rtol=1e-4)
    other_input.remove()
    assert builds and len(builds) % (2 * len(blocks)) == 0  # k computed its own [x, ranks]; q and v shared as before
    wrong = model.encode(items, adapter="code")
    assert (wrong - fused).abs().max() > 1e-3


def test_fused_pass_leaves_a_replaced_forward_alone(model, monkeypatch):
    """A layer whose forward someone else replaced (accelerate's hooks do) keeps it: that layer adds its delta
    after the projection instead, and the vectors are the same."""
    model.adapter_batching, model.attention_packing = "mixed", "on"
    expected = model.encode(ITEMS)
    monkeypatch.setattr(adapters_module(model), "FUSED_MIN_TOKENS", 1)
    q_proj = next(layer for name, layer in model.named_modules() if name.endswith("layers.0.self_attn.q_proj"))
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        return type(q_proj).forward(q_proj, *args, **kwargs)

    q_proj.forward = wrapped
    torch.testing.assert_close(model.encode(ITEMS), expected, atol=1e-5, rtol=1e-4)
    assert calls and q_proj.__dict__["forward"] is wrapped


def test_token_adapters_are_built_where_cu_seqlens_is_without_reading_it_back(model):
    """A packed mixed pass on a GPU gets cu_seqlens there; reading it back to the host waited for every pass queued
    before (the GPU idled ~8 ms per pass of workload 4 "mixed" on the H200). On the meta device, where nothing can be
    read back, the token adapters are still built; on the CPU they mark padding after the items as the bare
    backbone (-1)."""
    module = adapters_module(model)
    names, cu_seqlens = ["code", BASE, "custom"], torch.tensor([0, 3, 5, 9], dtype=torch.int32)
    on_cpu = module._token_adapters(names, ["code", "custom"], cu_seqlens, 12)
    assert on_cpu.tolist() == [[0, 0, 0, -1, -1, 1, 1, 1, 1, -1, -1, -1]]
    assert module._token_adapters(names, ["code", "custom"], cu_seqlens).shape == (1, 9)
    on_meta = module._token_adapters(names, ["code", "custom"], cu_seqlens.to("meta"), 12)
    assert on_meta.device.type == "meta" and on_meta.shape == (1, 12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_token_adapters_need_no_host_sync(model):
    """On a GPU the token adapters come from cu_seqlens on the device with no synchronising call (CUDA's sync debug
    mode turns one into an error), equal to those built on the CPU."""
    module = adapters_module(model)
    names, cu_seqlens = ["code", BASE, "custom"], torch.tensor([0, 3, 5, 9], dtype=torch.int32)
    on_gpu = cu_seqlens.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        built = module._token_adapters(names, ["code", "custom"], on_gpu, 12)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert built.tolist() == module._token_adapters(names, ["code", "custom"], cu_seqlens, 12).tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fused_mixed_pass_equals_the_added_deltas(tiny_nova_dir, custom_adapter, monkeypatch):
    """On the GPU as encode runs there by default (bf16, blocks compiled by inductor): a fused mixed pass gives the
    vectors of the pass that adds the deltas, and of each item alone."""
    model = load(tiny_nova_dir, dtype=torch.bfloat16).to("cuda")
    model.load_adapter(custom_adapter, adapter_name="custom")
    model.adapter_batching, model.cuda_graphs = "mixed", "off"  # (graphs replay small calls unfused)
    items = ITEMS * 4
    added = model.encode(items)
    monkeypatch.setattr(adapters_module(model), "FUSED_MIN_TOKENS", 1)
    seen, handles = fused_layers_seen(model)
    fused = model.encode(items)
    for handle in handles:
        handle.remove()
    assert seen >= {"q_proj", "o_proj", "gate_proj", "up_proj"}
    assert torch.nn.functional.cosine_similarity(fused, added).min() > 0.999
    alone = torch.stack([model.encode([item])[0] for item in items])
    assert torch.nn.functional.cosine_similarity(fused, alone).min() > 0.999
