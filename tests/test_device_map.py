"""Loading with accelerate's device_map: the task adapters load beside the layers they wrap, or are refused clearly.

CPU only here: ``device_map="auto"`` and ``{"": "cpu"}`` keep every module on the CPU; a small ``max_memory`` with an
``offload_folder`` offloads part of the weights to disk (meta parameters swapped in by accelerate's hooks).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModel

TEXTS = ["what is late interaction?", "a passage about rivers"]
TASKS = ["retrieval.query", "retrieval.passage", "text-matching", "code.query"]


@pytest.fixture(scope="module")
def reference(tiny_nova_dir: Path):
    return AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True)


def half_of_the_weights(repo: Path) -> dict[str, int]:
    """A max_memory that fits about half of the checkpoint on the CPU: the rest is offloaded to disk."""
    return {"cpu": (repo / "model.safetensors").stat().st_size // 2}


@pytest.mark.parametrize("device_map", ["auto", {"": "cpu"}])
def test_device_map_loads_the_task_adapters(tiny_nova_dir: Path, reference, device_map) -> None:
    model = AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True, device_map=device_map)
    assert model.list_adapters() == reference.list_adapters() == ["retrieval", "text-matching", "code"]
    for task in TASKS:
        torch.testing.assert_close(model.encode(TEXTS, task=task), reference.encode(TEXTS, task=task), atol=1e-6, rtol=0)
    # the adapters do change the output (else the comparison above proves nothing about them)
    assert not torch.allclose(model.encode(TEXTS, task="retrieval.query"), model.encode(TEXTS, adapter=None), atol=1e-4)


def test_loading_an_adapter_keeps_every_module_where_the_device_map_put_it(tiny_nova_dir: Path) -> None:
    model = AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True, device_map={"": "cpu"},
                                      load_task_adapters=False)
    before = {name: param.device for name, param in model.named_parameters()}
    model.load_adapter(tiny_nova_dir / "adapters" / "retrieval", adapter_name="extra")
    after = {name.replace(".base_layer", ""): param.device for name, param in model.named_parameters()}
    assert all(after[name] == device for name, device in before.items())
    new = {name: device for name, device in after.items() if ".lora_" in name}
    assert new and all(device.type == "cpu" for device in new.values())


def test_offloaded_weights_refuse_adapters_with_a_clear_message(tiny_nova_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"offloaded by its device_map .* load_task_adapters=False"):
        AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True, device_map="auto",
                                  max_memory=half_of_the_weights(tiny_nova_dir), offload_folder=str(tmp_path / "offload"))


def test_offloaded_bare_backbone_encodes_as_the_loaded_model(tiny_nova_dir: Path, reference, tmp_path: Path) -> None:
    model = AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True, device_map="auto",
                                      max_memory=half_of_the_weights(tiny_nova_dir),
                                      offload_folder=str(tmp_path / "offload"), load_task_adapters=False)
    assert "disk" in set(model.hf_device_map.values())  # really offloaded
    assert model.list_adapters() == []
    torch.testing.assert_close(model.encode(TEXTS, adapter=None), reference.encode(TEXTS, adapter=None), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="offloaded by its device_map"):
        model.load_adapter(tiny_nova_dir / "adapters" / "retrieval", adapter_name="extra")
    assert model.list_adapters() == []


def test_every_weight_offloaded_still_encodes_as_the_loaded_model(tiny_nova_dir: Path, reference, tmp_path: Path) -> None:
    """With every weight on disk the parameters sit on the meta device: inputs go where accelerate's hooks run."""
    model = AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True, device_map="auto", max_memory={"cpu": 1000},
                                      offload_folder=str(tmp_path / "offload"), load_task_adapters=False)
    assert set(model.hf_device_map.values()) == {"disk"} and model.device.type == "meta"
    torch.testing.assert_close(model.encode(TEXTS, adapter=None), reference.encode(TEXTS, adapter=None), atol=1e-6, rtol=0)
