"""Adapter management of nova-embeddings-v1: PEFT LoRA adapters loaded, listed, routed per batch and saved.

PEFT's own state is the only record kept:
- which adapters exist: the keys of the LoRA layers' ``lora_A`` (configs in ``model.peft_config``);
- what a plain ``forward`` computes: each LoRA layer's active adapter(s) and disabled flag.
Adapters added or removed through PEFT or transformers' API therefore show up here at once. ``encode`` states
every row's adapter explicitly for each batch (vLLM's rule: a batch carries its row -> adapter mapping) and puts
the layers back as they were when the call ends, so nothing depends on an earlier call and whatever the user
selected (``set_adapter``, ``disable_adapters``) is what a bare ``forward`` uses.
"""

from __future__ import annotations

import functools
import os
import types
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .processing_nova_embeddings_v1 import TASK_ADAPTER, EmbeddingItem, ItemError

if TYPE_CHECKING:  # pragma: no cover
    from peft.tuners.lora.layer import LoraLayer

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FUSED_MIN_TOKENS = 4096  # a stacked pass this large fuses deltas into the GEMMs (the weights' copy then pays off)
# inputs up to this wide are copied beside the ranks rather than a delta added (H200, 16k tokens, compiled: 2,048 ->
# 256 took 0.107 ms fused against 0.170 with the delta added; 11,008 -> 2,048 took 2.10 against 1.10)
FUSED_MAX_INPUT = 4096
# projections a module calls on one input (transformers' Qwen2.5-VL text attention and MLP), widest output first: a
# fused stacked pass builds their [x, ranks] inputs as views of one buffer (``SharedInput``)
SHARED_INPUT_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
MERGE_MIN_TOKENS = 4096  # below this, merging (two weight copies of ~5.5 GB at full size) costs more than unmerged LoRA
PEFT_PREFIX = "base_model.model."  # how PeftModel.save_pretrained prefixes adapter keys
LOADED_MARK = "_nova_lora_base"  # set on each projection that one of our adapters wraps
WRAPPER_MARK = "_nova_lora_wrapper"  # set on the LoRA layer wrapping it: a new wrapper (PEFT's, after an unload) lacks it


class AdapterStateError(RuntimeError):
    """The LoRA layers are in a state that per-item routing cannot honour (e.g. merged into the weights)."""


# Walking the ~5,000 modules of the full-size model costs milliseconds, more than a short query's forward pass.
# Every change of the module tree that matters here (PEFT injecting or unloading LoRA layers, a user replacing a
# module or a parameter) goes through nn.Module registration, so one process-wide counter of registrations tells
# when a cached walk is stale. Adapter names are still read live from the layers (deleting an adapter only empties dicts).
_registrations = 0


def _count_registration(module: nn.Module, name: str, submodule: nn.Module | None) -> None:
    global _registrations
    _registrations += 1


torch.nn.modules.module.register_module_module_registration_hook(_count_registration)
torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration)  # a parameter replaced


@dataclass
class ModuleIndex:
    """One walk of a model's module tree: every module, its LoRA layers, and the projections we wrapped."""

    version: int
    modules: list[nn.Module]
    parameters: list[nn.Parameter]
    lora_layers: list["LoraLayer"]
    # projections that held one of our adapters and lost its LoRA layer (PEFT's unload/merge_and_unload), even if a
    # LoRA layer was injected around them again since
    unwrapped: int
    vision_lora_layers: frozenset[int]  # ids of the LoRA layers inside the vision tower (they see patches, not tokens)
    # id of each LoRA layer that is called with the same input as LoRA siblings in its module -> the siblings, in
    # ``SHARED_INPUT_SIBLINGS``' order (an attention's q, k, v; an MLP's gate and up)
    siblings: dict[int, tuple["LoraLayer", ...]]


def module_index(model: nn.Module) -> ModuleIndex:
    """The model's ``ModuleIndex``, walked again only when a module was registered anywhere since the last walk."""
    from peft.tuners.lora.layer import LoraLayer

    cached = getattr(model, "_nova_module_index", None)
    if cached is not None and cached.version == _registrations:
        return cached
    version = _registrations
    modules = list(model.modules())
    layers = [module for module in modules if isinstance(module, LoraLayer)]
    ours = {id(layer.get_base_layer()) for layer in layers if getattr(layer, WRAPPER_MARK, False)}
    unwrapped = sum(getattr(m, LOADED_MARK, False) and id(m) not in ours for m in modules)
    vision = getattr(getattr(model, "model", None), "visual", None)
    in_vision = {id(module) for module in vision.modules()} if vision is not None else set()
    index = ModuleIndex(version, modules, list(model.parameters()), layers, unwrapped,
                        frozenset(id(layer) for layer in layers if id(layer) in in_vision),
                        _sibling_groups(modules, {id(layer) for layer in layers}, in_vision))
    object.__setattr__(model, "_nova_module_index", index)  # a plain attribute, not a submodule
    return index


def _sibling_groups(modules: list[nn.Module], lora_ids: set[int],
                    in_vision: set[int]) -> dict[int, tuple["LoraLayer", ...]]:
    """``ModuleIndex.siblings``: per module, its LoRA children named in one of ``SHARED_INPUT_SIBLINGS`` (two or
    more of them)."""
    groups: dict[int, tuple["LoraLayer", ...]] = {}
    for module in modules:
        if id(module) in in_vision:
            continue
        children = module._modules
        for names in SHARED_INPUT_SIBLINGS:
            group = tuple(children[name] for name in names if id(children.get(name)) in lora_ids)
            if len(group) > 1:
                groups.update((id(layer), group) for layer in group)
    return groups


def lora_layers(model: nn.Module) -> list["LoraLayer"]:
    """Every PEFT LoRA layer of the model, in module order."""
    return module_index(model).lora_layers


def layer_adapter_names(layers: Sequence["LoraLayer"]) -> set[str]:
    """Adapters present in the LoRA layers (PEFT's per-layer ``lora_A`` keys).

    Read from the ModuleDicts' own dicts: ``prepare_items`` asks once per call (a server, once per request), and
    over a full-size model's 253 layers ``layer.lora_A.keys()`` (two ``nn.Module`` lookups a layer) took ~7x as long."""
    return set().union(*(layer._modules["lora_A"]._modules for layer in layers))


def _plain_lora_linear(layer: "LoraLayer", name: str) -> bool:
    """Whether merging ``name`` into ``layer`` is exactly W + scaling * B @ A (vanilla LoRA on a Linear)."""
    weight = _plain_lora_base(layer)
    return weight is not None and _plain_adapter(layer, name, layer.lora_A[name].weight, layer.lora_B[name].weight,
                                                 weight)


def _plain_lora_base(layer: "LoraLayer") -> torch.Tensor | None:
    """The base weight of a LoRA layer whose adapters can be vanilla LoRA (PEFT's ``Linear``, not fan-in-fan-out, a
    2-D weight), else None."""
    from peft.tuners.lora.layer import Linear

    if not isinstance(layer, Linear) or layer.fan_in_fan_out:
        return None
    weight = _base_module(layer)._parameters.get("weight")
    return weight if weight is not None and weight.dim() == 2 else None


def _plain_adapter(layer: "LoraLayer", name: str, a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether adapter ``name`` of a ``_plain_lora_base`` layer (base weight ``weight``, its A and B weights ``a``,
    ``b``) is vanilla LoRA: no variant (DoRA...), no LoRA bias, the base's dtype and device."""
    return (name not in getattr(layer, "lora_variant", {}) and not getattr(layer, "lora_bias", {}).get(name, False)
            and a.dtype == b.dtype == weight.dtype and a.device == weight.device)


def _base_module(layer: nn.Module) -> nn.Module:
    """PEFT's ``get_base_layer`` through the modules' own dicts (its ``hasattr`` raises and catches per level)."""
    while "base_layer" in layer._modules:
        layer = layer._modules["base_layer"]
    return layer


def _unwrapped_message(unwrapped: int) -> str:
    return (f"{unwrapped} projections lost their LoRA layers outside unload_adapter: the adapters were merged into "
            "the weights and unloaded (PEFT's merge_and_unload) or unloaded (PEFT's unload), so per-task routing "
            "is no longer possible on these weights. Reload the model (AutoModel.from_pretrained) to route again, "
            "or remove adapters with model.unload_adapter(name).")


def _set_layer_state(layer: "LoraLayer", active: list[str], disabled: bool) -> None:
    """Write the two per-layer fields PEFT's ``set_adapter``/``enable_adapters`` write, without their side
    effect on ``requires_grad`` (an inference call must not freeze or unfreeze the user's trainable weights)."""
    object.__setattr__(layer, "_active_adapter", list(active))  # plain attributes: skip nn.Module's slower setattr
    object.__setattr__(layer, "_disable_adapters", disabled)


def _base_key(key: str) -> str | None:
    """A model state-dict key without PEFT's wrapping, or None for an adapter tensor."""
    if ".lora_" in key:
        return None
    return key.replace(".base_layer.", ".")


class AdapterManager:
    """Loads, lists, unloads, routes and saves the model's LoRA adapters, reading PEFT's state each time."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.merging = "auto"  # "auto": merge a big single-adapter group into the weights on CUDA; "on"; "off"
        self._merge_backup: dict[nn.Module, tuple[torch.Tensor, torch.Tensor | None]] = {}  # original weight, bias

    # ------------------------------------------------------------------ what exists
    def names(self) -> list[str]:
        """Loaded adapters: task adapters in the config's order, then the others sorted."""
        present = layer_adapter_names(lora_layers(self.model))
        tasks = [t for t in self.model.config.task_names if t in present]
        return tasks + sorted(present - set(tasks))

    def custom_adapters(self) -> list[str]:
        tasks = set(self.model.config.task_names)
        return [name for name in self.names() if name not in tasks]

    def check_routable(self, layers: Sequence["LoraLayer"], unwrapped: int) -> None:
        """Refuse the states in which per-item routing would silently compute something else."""
        if unwrapped:
            raise AdapterStateError(_unwrapped_message(unwrapped))
        merged = sorted({name for layer in layers if layer not in self._merge_backup for name in layer.merged_adapters})
        if merged:
            raise AdapterStateError(
                f"adapter(s) {merged} are merged into the base weights (PEFT's merge_adapter/merge); encode routes each "
                "item to its own adapter and cannot honour a merge: call model.unmerge_adapter() (PEFT) first")

    # ------------------------------------------------------------------ routing
    def resolve(self, item: EmbeddingItem, call_adapter: str | None = TASK_ADAPTER, names: Sequence[str] | None = None) -> str:
        """The adapter an item runs with: its own ``adapter``, else the call's, else its task's.

        A task whose adapter is not loaded runs on the bare backbone when the model holds no task adapter at all
        (a base model, or one that only has custom adapters); when other task adapters are loaded, a missing one
        is an error rather than a silent change of model.
        """
        names = self.names() if names is None else names
        chosen = item.adapter if item.adapter != TASK_ADAPTER else call_adapter
        if chosen is None:
            return BASE
        if chosen != TASK_ADAPTER:
            if chosen not in names:
                raise ItemError(item.index, f"unknown adapter {chosen!r}; loaded adapters: {list(names)}")
            return chosen
        task_adapter = self.model.config.adapter_task(item.task)
        if task_adapter in names:
            return task_adapter
        tasks = set(self.model.config.task_names)
        if not any(name in tasks for name in names):
            return BASE
        raise ItemError(item.index, f"task {item.task!r} routes to adapter {task_adapter!r}, which is not loaded; "
                                    f"loaded adapters: {list(names)} (pass adapter=None for the bare backbone)")

    @contextmanager
    def call_scope(self) -> Iterator["BatchRouter"]:
        """One encode call: check the state, route batch by batch, then put every layer back as it was."""
        index = module_index(self.model)
        layers = index.lora_layers
        self.check_routable(layers, index.unwrapped)
        saved = [(layer, list(layer.active_adapters), layer.disable_adapters) for layer in layers]
        router = BatchRouter(self, layers)
        try:
            yield router
        finally:
            self.restore_merged()
            for layer, active, disabled in saved:
                _set_layer_state(layer, active, disabled)

    def _refuse_unloaded_weights(self) -> None:
        """Adding an adapter would wrap projections that may carry a merged adapter and hide that they lost theirs."""
        unwrapped = module_index(self.model).unwrapped
        if unwrapped:
            raise ValueError(_unwrapped_message(unwrapped))

    def should_merge(self, group_tokens: int) -> bool:
        if self.merging == "on":
            return True
        if self.merging == "off":
            return False
        return self.model.device.type == "cuda" and group_tokens >= MERGE_MIN_TOKENS

    def merge(self, name: str, layers: Sequence["LoraLayer"]) -> None:
        """Merge one adapter into the base weights, keeping the originals to restore exactly.

        The parameter is pointed at a new tensor holding the merged weights, its original kept aside: restoring
        points it back. A plain LoRA linear layer merges as one ``addmm`` (W + scaling * B @ A, what PEFT's merge
        adds) into that tensor, so a merge and restore move the weights once (reading W, writing W') instead of
        three times (a backup copy, the in-place add, the copy back). Other kinds (DoRA, LoRA bias, fan-in-fan-out)
        go through PEFT's in-place ``merge`` on copies of the weight and bias (a LoRA bias merges into the base
        bias). PEFT's per-layer Python cost x 252 layers made a merge cost ~25 ms on the GPU, more than it saved
        on a few thousand tokens."""
        for layer in layers:
            if name in layer.lora_A and layer not in self._merge_backup:
                base = layer.get_base_layer()
                weight, bias = base.weight, getattr(base, "bias", None)
                _set_layer_state(layer, [name], False)
                self._merge_backup[layer] = (weight.data, None if bias is None else bias.data)
                if _plain_lora_linear(layer, name):
                    with torch.no_grad():
                        weight.data = torch.addmm(weight.data, layer.lora_B[name].weight, layer.lora_A[name].weight,
                                                  alpha=layer.scaling[name])
                    layer.merged_adapters.append(name)
                else:
                    for parameter in (weight, bias):
                        if parameter is not None:
                            parameter.data = parameter.data.clone()
                    layer.merge(adapter_names=[name])

    def restore_merged(self) -> None:
        """Put the exact original weights and biases back (subtracting the delta again would drift in bf16)."""
        for layer, (weight, bias) in self._merge_backup.items():
            base = layer.get_base_layer()
            base.weight.data = weight
            if bias is not None:
                base.bias.data = bias
            layer.merged_adapters.clear()
        self._merge_backup = {}

    # ------------------------------------------------------------------ load / unload
    def load(self, source: str | os.PathLike, name: str, *, as_task_adapter: bool = False, **hub_kwargs: Any) -> None:
        """Load a standard PEFT LoRA adapter under ``name``; all or nothing."""
        from peft import LoraConfig, PeftConfig
        from safetensors.torch import load_file

        self.check_new_name(name, as_task_adapter)
        folder = adapter_folder(source, **hub_kwargs)
        config = PeftConfig.from_pretrained(folder)
        if not isinstance(config, LoraConfig):
            raise ValueError(f"{folder}: only LoRA adapters are supported, got {type(config).__name__}")
        config.inference_mode = True
        try:
            state = load_file(os.path.join(folder, ADAPTER_WEIGHTS))
        except Exception as error:
            raise ValueError(f"{folder}/{ADAPTER_WEIGHTS}: unreadable safetensors file ({error})") from None
        _check_finite(state, f"{folder}/{ADAPTER_WEIGHTS}")
        self.add(config, name, state={k.removeprefix(PEFT_PREFIX): v for k, v in state.items()}, source=str(folder))

    def add(self, config: Any, name: str, state: dict[str, torch.Tensor] | None = None, source: str = "config") -> None:
        """Inject an adapter's LoRA layers (PEFT's ``inject_adapter_in_model``) and, if given, its weights.

        Which adapters are active for a plain ``forward`` does not change; a failure removes what was injected.
        """
        from peft import inject_adapter_in_model, set_peft_model_state_dict

        _refuse_offloaded_weights(self.model, name)
        self._refuse_unloaded_weights()
        saved = {layer: (list(layer.active_adapters), layer.disable_adapters) for layer in lora_layers(self.model)}
        # a new layer computes what the model computed before: the others' active adapters, or none at all
        new_layer_state = next(iter(saved.values())) if saved else ([], False)
        try:
            with warnings.catch_warnings():  # PEFT warns that peft_config exists: we keep it in step on purpose
                warnings.filterwarnings("ignore", message=".*Already found a `peft_config` attribute.*")
                inject_adapter_in_model(config, self.model, adapter_name=name)
            if state is not None:
                result = set_peft_model_state_dict(self.model, state, adapter_name=name)
                _check_fully_loaded(name, state, result)
        except Exception as error:
            self.remove(name)
            raise ValueError(f"could not load adapter {name!r} from {source}: {error}") from error
        self.model.peft_config[name] = config
        for layer in lora_layers(self.model):
            _set_layer_state(layer, *saved.get(layer, new_layer_state))
            setattr(layer.get_base_layer(), LOADED_MARK, True)
            setattr(layer, WRAPPER_MARK, True)
            layer.train(self.model.training)  # injected modules start in training mode: dropout would leak into eval
            _place_beside_base_layer(layer, name)

    def remove(self, name: str) -> None:
        """Delete an adapter from every layer (PEFT's ``delete_adapter``) and from ``peft_config``."""
        from peft.functional import delete_adapter

        with warnings.catch_warnings():  # PEFT notes which adapter becomes "active": routing never relies on that
            warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
            delete_adapter(self.model, adapter_name=name, prefix="lora_")
        getattr(self.model, "peft_config", {}).pop(name, None)

    def unload(self, name: str) -> None:
        names = self.names()
        if name not in names:
            raise ValueError(f"no adapter named {name!r}; loaded adapters: {names}")
        layers = lora_layers(self.model)
        if any(name in layer.merged_adapters for layer in layers):
            raise AdapterStateError(f"adapter {name!r} is merged into the weights; unmerge it first")
        self.remove(name)

    def check_new_name(self, name: Any, as_task_adapter: bool) -> None:
        """Refuse a name that is invalid, taken, or a task's (unless ``as_task_adapter``), before any work."""
        if not isinstance(name, str) or not name or "." in name or name in (BASE, TASK_ADAPTER):
            raise ValueError(f"invalid adapter name {name!r}: a non-empty string without '.', not {BASE!r}")
        if name in self.names():
            raise ValueError(f"an adapter named {name!r} is already loaded; unload it first")
        if name in self.model.config.task_names and not as_task_adapter:
            raise ValueError(f"{name!r} is a task name: items of task {name!r} would route to this adapter. Pick another "
                             f"name, or pass as_task_adapter=True to make it the {name!r} task's adapter")

    # ------------------------------------------------------------------ save
    def save(self, root: str | os.PathLike) -> list[str]:
        """Write every adapter as a standard PEFT folder ``root/<adapters_dir>/<name>/``; returns the names."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        names = self.names()
        for name in names:
            folder = os.path.join(root, self.model.config.adapters_dir, name)
            os.makedirs(folder, exist_ok=True)
            # no embedding copies: base weights are saved beside the adapters, and "auto" would look the adapter's
            # base_model_name_or_path up on the Hub to see whether the vocabulary was resized (it never is)
            state = get_peft_model_state_dict(self.model, adapter_name=name, save_embedding_layers=False)
            state = {PEFT_PREFIX + key: value.detach().cpu().contiguous() for key, value in state.items()}
            save_file(state, os.path.join(folder, ADAPTER_WEIGHTS), metadata={"format": "pt"})
            self.model.peft_config[name].save_pretrained(folder)
        return names

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's weights under their original names, without LoRA tensors or PEFT's ``base_layer`` wrapping."""
        layers = lora_layers(self.model)
        merged = sorted({n for layer in layers for n in layer.merged_adapters})
        if merged:
            raise AdapterStateError(f"adapter(s) {merged} are merged into the base weights: unmerge before saving, or the "
                                    "saved base weights would carry them")
        state = {}
        for key, value in self.model.state_dict().items():
            base = _base_key(key)
            if base is not None:
                state[base] = value
        return state


class BatchRouter:
    """Sets the LoRA layers for one batch at a time within an encode call (see ``AdapterManager.call_scope``)."""

    def __init__(self, manager: AdapterManager, layers: list["LoraLayer"]):
        self.manager = manager
        self.layers = layers
        self.merged: str | None = None

    def enter(self, row_adapters: Sequence[str], group_tokens: int = 0) -> list[str] | None:
        """Make the layers compute this batch's adapters; returns per-row names when the rows differ.

        One adapter: that adapter active on every layer (merged into the weights when the call has enough of its
        tokens on CUDA); the bare backbone: adapters disabled; rows that differ: PEFT's mixed-batch forward.
        """
        if not self.layers:
            return None
        names = set(row_adapters)
        name = next(iter(names))
        if len(names) == 1 and name != BASE and self.manager.should_merge(group_tokens):
            if self.merged != name:
                self.manager.restore_merged()
                self.manager.merge(name, self.layers)
                self.merged = name
            return None
        if self.merged is not None:
            self.manager.restore_merged()
            self.merged = None
        if len(names) > 1:
            for layer in self.layers:
                _set_layer_state(layer, layer.active_adapters, False)
            return list(row_adapters)
        for layer in self.layers:  # a layer without this adapter computes the bare projection
            _set_layer_state(layer, [name] if name != BASE else [], False)
        return None


@contextmanager
def rows_routed(model: nn.Module, adapter_names: Sequence[str] | None, cu_seqlens: torch.Tensor | None = None,
                tokens: int = 0):
    """Route each row (each packed item, given ``cu_seqlens``) to its adapter for one forward pass of ``tokens``
    tokens (padding included).

    At inference, when every layer holding these adapters is a plain LoRA linear over the language model's tokens,
    each layer adds the deltas of every stackable adapter in one stacked pass (``stacked_routing``; fused into the
    projections' GEMMs from ``FUSED_MIN_TOKENS`` on); otherwise PEFT's own mixed-batch forward (per-adapter dropout
    and gradients while training), which needs padded rows.
    """
    if adapter_names is None:
        yield
        return
    layers = lora_layers(model)
    known = layer_adapter_names(layers) | {BASE}
    unknown = sorted(set(adapter_names) - known)
    if unknown:
        raise ValueError(f"adapter_names: unknown adapter(s) {unknown}; loaded: {sorted(known - {BASE})} "
                         f"({BASE!r} for the bare backbone)")
    if not layers:
        yield
        return
    names = sorted(set(adapter_names) - {BASE})
    stackable = stackable_adapters(model)
    if set(names) <= set(stackable):
        with stacked_routing(layers, stackable, _token_adapters(adapter_names, stackable, cu_seqlens, tokens),
                             fuse=tokens >= FUSED_MIN_TOKENS, siblings=module_index(model).siblings):
            yield
        return
    if cu_seqlens is not None:
        raise ValueError(f"packed items of several adapters need adapters that stack (plain LoRA on the language "
                         f"model, at inference); {names} do not: run one adapter per batch, or padded rows")
    from peft.tuners.lora.model import _adapter_names_pre_forward_hook

    saved = [(layer, layer.active_adapters, layer.disable_adapters) for layer in layers]
    hook = functools.partial(_adapter_names_pre_forward_hook, adapter_names=list(adapter_names))
    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    for layer in layers:  # PEFT's mixed forward runs on enabled layers only (a disabled layer ignores it)
        _set_layer_state(layer, layer.active_adapters, False)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for layer, active, disabled in saved:
            _set_layer_state(layer, active, disabled)


@contextmanager
def stacked_routing(layers: Sequence["LoraLayer"], names: list[str], token_adapters: torch.Tensor, fuse: bool = False,
                    siblings: dict[int, tuple["LoraLayer", ...]] | None = None):
    """For the passes run inside: each layer computes its base projection and adds, for every token, the delta of
    its adapter among ``names`` (``token_adapters``: an index into ``names`` per token, -1 for the bare backbone;
    see ``_token_adapters`` for its shapes). Yields the layers' ``StackedPass`` objects: whoever records the
    passes (a CUDA graph) keeps them, since the recorded kernels read their tensors.

    With ``fuse`` (large passes), layers that ``fuses`` picks compute projection and delta as one GEMM
    (``fused_lora_forward``); the others, and every layer without it, add the delta after the projection
    (``add_stacked_deltas``). Fused layers that ``siblings`` (``ModuleIndex.siblings``) groups read one shared
    input buffer (``SharedInput``).

    ``names`` is every stackable adapter, not only the batch's: the pass then has the same shapes and reads the same
    attributes whichever adapters a batch mixes, so compiled blocks and graphs are not rebuilt per mix. The cost is
    the absent adapters' ranks (r = 32 each: ~3% of a projection's FLOPs per adapter).
    """
    on_device: dict[torch.device, torch.Tensor] = {}  # one copy per device for the whole pass, not per layer
    if token_adapters.device.type != "cpu":
        on_device[token_adapters.device] = token_adapters
    saved = [(layer, layer.active_adapters, layer.disable_adapters) for layer in layers]
    passes, handles, fused = [], [], []
    names = tuple(names)
    try:
        for layer in layers:
            passes.append(stacked_pass(layer, names, token_adapters, on_device))
            object.__setattr__(layer, STACKED_PASS, passes[-1])
            if fuse and passes[-1].held and fuses(layer):
                object.__setattr__(layer, "forward", _fused_forward_of(layer))  # this instance only, for the pass
                fused.append(layer)
            else:
                _set_layer_state(layer, layer.active_adapters, True)  # the layer computes the base projection only
                handles.append(layer.register_forward_hook(add_stacked_deltas))
        _share_inputs(fused, siblings or {})
        yield passes
    finally:
        for handle in handles:
            handle.remove()
        for layer in fused:
            del layer.__dict__["forward"]
        for layer, active, disabled in saved:
            _set_layer_state(layer, active, disabled)
            object.__setattr__(layer, STACKED_PASS, None)


def _stack_blockers(model: nn.Module, dropout_disabled: bool) -> set[str]:
    """Adapters a stacked pass cannot compute exactly as PEFT's mixed batch would: any of them with a layer that
    is not a plain LoRA linear on the language model's tokens (the vision tower's layers see patches, not the
    rows' tokens) or whose dropout is active (unless ``dropout_disabled`` for the pass); all of them while
    gradients are on (training keeps PEFT's forward)."""
    index = module_index(model)
    if torch.is_grad_enabled():
        return layer_adapter_names(index.lora_layers)
    blocked: set[str] = set()
    # (this runs per encode call in "mixed" mode and per stacked pass: the ModuleDicts' own dicts and each layer's
    # checks once, not per adapter; nn.Module lookups made it ~15 ms at full size)
    for layer in index.lora_layers:
        modules = layer._modules
        lora_a, lora_b, dropouts = (modules[key]._modules for key in ("lora_A", "lora_B", "lora_dropout"))
        names = [name for name in lora_a if name not in blocked]
        if not names:
            continue
        weight = _plain_lora_base(layer) if id(layer) not in index.vision_lora_layers else None
        if weight is None:
            blocked.update(names)
            continue
        for name in names:
            dropout = dropouts[name]
            dropping = not dropout_disabled and dropout.training and getattr(dropout, "p", 0) > 0
            if dropping or not _plain_adapter(layer, name, lora_a[name]._parameters["weight"],
                                              lora_b[name]._parameters["weight"], weight):
                blocked.add(name)
    return blocked


def can_stack(model: nn.Module, names: Sequence[str], dropout_disabled: bool = False) -> bool:
    """Whether one stacked pass computes exactly what PEFT's mixed batch would for these adapters (``_stack_blockers``)."""
    return not set(names) & _stack_blockers(model, dropout_disabled)


def stackable_adapters(model: nn.Module, dropout_disabled: bool = False) -> list[str]:
    """Every loaded adapter a stacked pass can carry, sorted (the adapters of ``stacked_routing``)."""
    return sorted(layer_adapter_names(lora_layers(model)) - _stack_blockers(model, dropout_disabled))


def _token_adapters(adapter_names: Sequence[str], names: list[str], cu_seqlens: torch.Tensor | None,
                    tokens: int | None = None) -> torch.Tensor:
    """Each token's adapter index in ``names`` (-1: the bare backbone), shaped to broadcast over a layer's input
    without its last dimension: (rows, 1) for padded rows, (1, tokens) for packed items (``tokens``: the packed
    row's length, padding included, -1 after the last item).

    Built where ``cu_seqlens`` is. On a GPU, reading it back (``.cpu()``) waited for every pass queued before this
    one: the GPU then idled while the host set up this pass (H200, workload 4 "mixed": ~8 ms per pass)."""
    index = torch.tensor([names.index(name) if name != BASE else -1 for name in adapter_names])
    if cu_seqlens is None:
        return index.unsqueeze(1)
    tokens = int(cu_seqlens[-1]) if not tokens else tokens
    index = torch.cat([index, index.new_full((1,), -1)])  # the padding after the items: a last run of -1
    ends = torch.cat([cu_seqlens[1:], cu_seqlens.new_full((1,), tokens)])
    if cu_seqlens.device.type == "cpu":
        return index.repeat_interleave(ends - cu_seqlens)[None]
    if cu_seqlens.device.type == "cuda":
        index = index.pin_memory()
    index = index.to(cu_seqlens.device, non_blocking=True)
    return index.repeat_interleave(ends - cu_seqlens, output_size=tokens)[None]  # output_size given: no host sync


STACKED_PASS = "_nova_stacked_pass"  # set on each LoRA layer for one stacked forward pass (see add_stacked_deltas)
RANK_OWNERS = "_nova_rank_owners"  # each LoRA layer's cached (key, owner, scaling) tables


@dataclass
class StackedPass:
    """One LoRA layer's part of a stacked pass: the adapters it holds, which of them owns each stacked rank and its
    scaling, and each token's adapter (an index into the pass's adapters, -1 for the bare backbone)."""

    held: tuple[str, ...]
    owner: torch.Tensor  # (ranks,)
    scaling: torch.Tensor  # (ranks,)
    token_adapters: torch.Tensor  # (rows, 1) or (1, tokens)
    shared: "SharedInput | None" = None  # the fused siblings' input buffer, if the layer has fused siblings
    position: int = 0  # the layer's place among them


def stacked_pass(layer: "LoraLayer", names: tuple[str, ...], token_adapters: torch.Tensor,
                 on_device: dict[torch.device, torch.Tensor]) -> StackedPass:
    """The layer's ``StackedPass``; its rank tables are built once per set of adapters, ranks, scalings and device,
    the token adapters copied once per device (``on_device``, shared by the pass's layers)."""
    lora_a = layer._modules["lora_A"]._modules  # (not nn.Module lookups: this runs for every layer of every pass)
    held = tuple(name for name in names if name in lora_a)
    device = lora_a[held[0]]._parameters["weight"].device if held else torch.device("cpu")
    ranks, scalings = layer.r, layer.scaling
    key = (names, held, tuple(ranks[name] for name in held), tuple(float(scalings[name]) for name in held), device)
    cached = getattr(layer, RANK_OWNERS, None)
    if cached is None or cached[0] != key:
        owner = [names.index(name) for name in held for _ in range(layer.r[name])]
        scaling = [float(layer.scaling[name]) for name in held for _ in range(layer.r[name])]
        cached = (key, torch.tensor(owner, device=device), torch.tensor(scaling, device=device))
        object.__setattr__(layer, RANK_OWNERS, cached)
    if device not in on_device:
        on_device[device] = token_adapters.to(device, non_blocking=True)
    return StackedPass(held, cached[1], cached[2], on_device[device])


def add_stacked_deltas(layer: "LoraLayer", args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Every row's LoRA delta of one layer in one pass (rows of several adapters in one batch, issue 11).

    PEFT's mixed batch loops over adapters (gather, two GEMMs, scatter each); here the layer's adapters are stacked:
    ``x @ [A_1; ...; A_n].T`` gives every token all ranks, each token keeps only its adapter's block (scaled), and
    one ``@ [B_1 ... B_n].T`` adds the deltas. The other blocks are multiplied by exact zeros, so each token gets
    its adapter's delta alone, as in PEFT; the extra FLOPs are the other adapters' ranks (r=32 each). One function
    for every layer and pass (compiled blocks see the same hook each time); the pass's data is on the layer.
    """
    routing: StackedPass = getattr(layer, STACKED_PASS)
    if not routing.held:
        return output
    b = _stacked_b(layer, routing)
    ranks = _stacked_ranks(layer, routing, args[0])
    # (torch.addmm into the output was tried: two H200 runs, w1 at 95k and 94k tokens/s, gave w4 "mixed" 57k with this
    # form and 47k with addmm, whose out-of-place form copies the output before its GEMM adds into it)
    return output + F.linear(ranks, b).to(output.dtype)


FUSED_FORWARD = "_nova_fused_forward"  # each LoRA layer's bound ``fused_lora_forward``, made once


def fuses(layer: "LoraLayer") -> bool:
    """Whether a large stacked pass computes this layer as one GEMM (``fused_lora_forward``): where copying the
    input costs less than the delta, i.e. the input is no wider than the output or than ``FUSED_MAX_INPUT``
    (Qwen2.5: every projection but down, whose 11,008-wide input costs more to copy than its 2,048-wide delta),
    and no one else has replaced the layer's ``forward`` (accelerate's offload hooks do)."""
    base = _base_module(layer)
    return base.in_features <= max(base.out_features, FUSED_MAX_INPUT) and "forward" not in layer.__dict__


def _fused_forward_of(layer: "LoraLayer") -> Any:
    """The layer's ``fused_lora_forward`` bound to it, made once: compiled blocks then see one function per layer."""
    bound = getattr(layer, FUSED_FORWARD, None)
    if bound is None:
        bound = types.MethodType(fused_lora_forward, layer)
        object.__setattr__(layer, FUSED_FORWARD, bound)
    return bound


def fused_lora_forward(layer: "LoraLayer", x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A stacked pass's projection and LoRA deltas as one GEMM: ``[x, ranks] @ [W, B_1 ... B_n].T + bias``.

    ``ranks`` are ``add_stacked_deltas``' (every adapter's ranks, each token keeping its adapter's block, scaled).
    Added after the projection, the delta is a (tokens, out) tensor written, read back and added: for a 2,048 ->
    11,008 projection over 16k tokens that traffic cost 45% of the projection's own time on an H200. Here the
    ranks ride along the GEMM's reduction instead (r = 32 per adapter: ~6% more K), for the price of copying the
    input and the weights beside the ranks (the input once per module where siblings share it: ``SharedInput``).
    Only in passes without gradients (``_stack_blockers``)."""
    routing: StackedPass = getattr(layer, STACKED_PASS)
    base = layer.get_base_layer()
    b = _stacked_b(layer, routing).to(base.weight.dtype)
    shared = routing.shared
    view = shared.input_for(routing.position, x) if shared is not None else None
    if view is not None:
        return F.linear(view, shared.weight_for(routing.position, base.weight, b), base.bias)
    ranks = _stacked_ranks(layer, routing, x)
    return F.linear(torch.cat([x, ranks.to(x.dtype)], dim=-1), torch.cat([base.weight, b], dim=1), base.bias)


@dataclass(eq=False)
class SharedInput:
    """One input shared by sibling projections in a fused stacked pass (``SHARED_INPUT_SIBLINGS``: an attention's
    q, k and v, an MLP's gate and up). The first sibling to run builds ``[r_1, x, r_2, ..., r_n]`` (``r_i``: sibling
    i's masked ranks) with one rank GEMM for all; sibling 1 multiplies the view ``[r_1, x]`` by ``[B_1, W_1]``,
    sibling j the view ``[x, r_2 ... r_j]`` by ``[W_j, 0, B_j]`` (zeros against the ranks between), each view read
    in place through its row stride. Each sibling copying x beside its own ranks cost ~37 ms of kernels in a
    workload-4 "mixed" call on the H200 (71,773 tokens, 4 passes). The buffer is let go once every sibling has
    run; a sibling called with another tensor than the one the buffer holds computes its own ``[x, ranks]``.
    """

    layers: tuple["LoraLayer", ...]  # in layout order, widest output first
    widths: tuple[int, ...]  # each sibling's stacked ranks
    source: torch.Tensor | None = None
    buffer: torch.Tensor | None = None
    remaining: int = 0  # siblings still to run on ``buffer``

    def input_for(self, position: int, x: torch.Tensor) -> torch.Tensor | None:
        """The sibling's view of the buffer built from ``x`` (built now if none is held), or None if the buffer
        holds another input."""
        if self.source is None:
            self.source, self.buffer, self.remaining = x, _build_shared_input(self, x), len(self.layers)
        view = None
        if self.source is x:
            first, width = self.widths[0], x.shape[-1]
            view = self.buffer[..., :first + width] if position == 0 else \
                self.buffer[..., first:first + width + sum(self.widths[1:position + 1])]
        self.remaining -= 1
        if self.remaining == 0:
            self.source = self.buffer = None
        return view

    def weight_for(self, position: int, weight: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The weights matching ``input_for``'s view: ``[B_1, W_1]``, or ``[W_j, 0, B_j]``."""
        if position == 0:
            return torch.cat([b, weight], dim=1)
        between = sum(self.widths[1:position])
        if not between:
            return torch.cat([weight, b], dim=1)
        return torch.cat([weight, weight.new_zeros(weight.shape[0], between), b], dim=1)


def _build_shared_input(shared: SharedInput, x: torch.Tensor) -> torch.Tensor:
    """``[r_1, x, r_2, ..., r_n]`` for ``SharedInput``: every sibling's masked ranks from one GEMM over ``x``."""
    passes = [getattr(layer, STACKED_PASS) for layer in shared.layers]
    a = torch.cat([_stacked_a(layer, routing) for layer, routing in zip(shared.layers, passes)])
    owner = torch.cat([routing.owner for routing in passes])
    scaling = torch.cat([routing.scaling for routing in passes])
    keep = (passes[0].token_adapters.unsqueeze(-1) == owner) * scaling
    ranks = (F.linear(x.to(a.dtype), a) * keep.to(a.dtype)).to(x.dtype)
    first = shared.widths[0]
    return torch.cat([ranks[..., :first], x, ranks[..., first:]], dim=-1)


def _share_inputs(fused: list["LoraLayer"], siblings: dict[int, tuple["LoraLayer", ...]]) -> None:
    """Give each group of fused siblings (two or more of a ``siblings`` group) one ``SharedInput`` for the pass."""
    fused_ids = {id(layer) for layer in fused}
    seen: set[int] = set()
    for layer in fused:
        group = siblings.get(id(layer))
        if group is None or id(group) in seen:
            continue
        seen.add(id(group))
        members = tuple(member for member in group if id(member) in fused_ids)
        if len(members) < 2:
            continue
        passes = [getattr(member, STACKED_PASS) for member in members]
        shared = SharedInput(members, tuple(routing.owner.shape[0] for routing in passes))
        for position, routing in enumerate(passes):
            routing.shared, routing.position = shared, position


def _stacked_b(layer: "LoraLayer", routing: "StackedPass") -> torch.Tensor:
    """``[B_1 ... B_n]``: the pass's adapters' B matrices side by side, (out, ranks)."""
    return torch.cat([layer.lora_B[name].weight for name in routing.held], dim=1)


def _stacked_a(layer: "LoraLayer", routing: "StackedPass") -> torch.Tensor:
    """``[A_1; ...; A_n]``: the pass's adapters' A matrices stacked, (ranks, in)."""
    return torch.cat([layer.lora_A[name].weight for name in routing.held])


def _stacked_ranks(layer: "LoraLayer", routing: "StackedPass", x: torch.Tensor) -> torch.Tensor:
    """``x @ [A_1; ...; A_n].T`` with each token's ranks outside its adapter's block zeroed and its own scaled."""
    a = _stacked_a(layer, routing)
    keep = (routing.token_adapters.unsqueeze(-1) == routing.owner) * routing.scaling  # the token's block, scaled
    return F.linear(x.to(a.dtype), a) * keep.to(a.dtype)


# ---------------------------------------------------------------------- files
def _refuse_offloaded_weights(model: nn.Module, name: str) -> None:
    """Refuse adapters on a model whose weights accelerate offloaded (``device_map`` with ``max_memory`` / ``offload_folder``).

    Offloaded modules keep their parameters on the meta device and accelerate's hooks swap the real tensors in for
    each forward pass from a weights map fixed at load time: LoRA weights added later would be written to meta (lost)
    and then missing from that map.
    """
    offloaded = [key for key, param in model.named_parameters() if param.device.type == "meta"]
    if offloaded:
        raise ValueError(
            f"cannot load adapter {name!r}: {len(offloaded)} weights of the model are offloaded by its device_map "
            f"(e.g. {offloaded[0]}), and LoRA adapters cannot be attached to offloaded weights. Load the model with "
            "a device_map that keeps every module on a device (more max_memory, no offload_folder), or pass "
            "load_task_adapters=False to run the bare backbone offloaded"
        )


def _place_beside_base_layer(layer: "LoraLayer", name: str) -> None:
    """Put one adapter's LoRA weights on the device of the layer they wrap.

    Only this adapter's tensors move: with a ``device_map`` the model spans several devices, and moving the whole
    model (``model.to(model.device)``) would undo the placement, or fail under accelerate's hooks.
    """
    device = layer.get_base_layer().weight.device
    for attribute in layer.adapter_layer_names:
        container = getattr(layer, attribute, None)
        if isinstance(container, nn.ModuleDict) and name in container:
            container[name].to(device)
        elif isinstance(container, nn.ParameterDict) and name in container:
            container[name].data = container[name].data.to(device)


def adapter_folder(source: str | os.PathLike, **kwargs: Any) -> str:
    """A local folder holding adapter_config.json and the weights, from a folder, a weights file or a Hub id."""
    source = str(source)
    if os.path.isfile(source) and os.path.basename(source) == ADAPTER_WEIGHTS:
        source = os.path.dirname(source) or "."
    if os.path.isdir(source):
        for needed in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            if not os.path.isfile(os.path.join(source, needed)):
                hint = " (adapter_model.bin is not supported: save it as safetensors)" if needed == ADAPTER_WEIGHTS and \
                    os.path.isfile(os.path.join(source, "adapter_model.bin")) else ""
                raise ValueError(f"{source}: not a PEFT adapter folder (missing {needed}){hint}")
        return source
    if os.path.exists(source) or source.startswith((".", "/")) or source.count("/") != 1:
        raise ValueError(f"{source}: no such adapter folder or {ADAPTER_WEIGHTS} file")
    from huggingface_hub import snapshot_download

    return snapshot_download(source, allow_patterns=[ADAPTER_CONFIG, ADAPTER_WEIGHTS], **kwargs)


def repository_adapter_folders(repo: str | os.PathLike, adapters_dir: str, task_names: Sequence[str]) -> dict[str, str]:
    """Adapter folders under ``repo/adapters_dir/`` (local or Hub) that hold weights: task adapters first."""
    repo = str(repo)
    if os.path.isdir(repo):
        root = os.path.join(repo, adapters_dir)
    else:
        from huggingface_hub import snapshot_download

        root = os.path.join(snapshot_download(repo, allow_patterns=[f"{adapters_dir}/*/*"]), adapters_dir)
    if not os.path.isdir(root):
        return {}
    found = sorted(n for n in os.listdir(root) if os.path.isfile(os.path.join(root, n, ADAPTER_WEIGHTS)))
    ordered = [t for t in task_names if t in found] + [n for n in found if n not in task_names]
    return {name: os.path.join(root, name) for name in ordered}


def _check_fully_loaded(name: str, state: dict, result: Any) -> None:
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    missing = [k for k in result.missing_keys if f".{name}." in k and "lora_" in k]
    if unexpected or missing:
        raise ValueError(f"{len(missing)} missing LoRA tensors (e.g. {missing[:3]}), "
                         f"{len(unexpected)} unexpected ones (e.g. {unexpected[:3]})")
    if not state:
        raise ValueError("the adapter file holds no tensors")


def _check_finite(state: dict[str, torch.Tensor], where: str) -> None:
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{where}: tensor {key!r} holds NaN or infinite values")


__all__ = ["AdapterManager", "AdapterStateError", "BASE", "can_stack", "lora_layers", "rows_routed", "stackable_adapters",
           "stacked_routing"]
