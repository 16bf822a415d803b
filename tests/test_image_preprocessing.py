"""Where ``encode`` resizes and normalises pictures: on the model's GPU by default on CUDA (transformers' torchvision
image processor takes a ``device``; the collate workers run it on a side stream), else on the CPU; the
``gpu_image_preprocessing`` knob turns it off. The vectors agree either way, and batches preprocessed on the side
stream while earlier batches run read their own pixels."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F
from helpers import make_image
from transformers import AutoModel

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SIZES = [(90, 60), (60, 90), (120, 80), (57, 33), (200, 120), (64, 64)]


def load(path, **kwargs):
    return AutoModel.from_pretrained(path, trust_remote_code=True, **kwargs)


def pictures(count: int, seed: int = 0) -> list[dict]:
    """Pictures of several sizes (so a call's batches hold several grids), some with text."""
    items = []
    for i in range(count):
        width, height = SIZES[(seed + i) % len(SIZES)]
        item = {"image": make_image(seed * 1000 + i, width=width, height=height)}
        if i % 3 == 1:
            item["text"] = f"caption {i}"
        items.append(item)
    return items


def test_pictures_are_preprocessed_on_the_cpu_without_cuda(tiny_nova_dir):
    model = load(tiny_nova_dir)
    assert model.gpu_image_preprocessing == "auto"
    assert model.image_preprocessing_device() is None


def test_gpu_image_preprocessing_setting_is_checked(tiny_nova_dir):
    model = load(tiny_nova_dir)
    model.gpu_image_preprocessing = "on"
    with pytest.raises(ValueError, match="gpu_image_preprocessing must be 'auto' or 'off'"):
        model.encode([{"image": make_image(1)}])


def test_a_cpu_only_image_processor_refuses_a_device(tiny_nova_dir):
    processor = load(tiny_nova_dir).processor
    if processor.preprocesses_on_device:
        pytest.skip("this transformers has torchvision: its image processor takes a device")
    with pytest.raises(ValueError, match="processes images on the CPU only"):
        processor.process_pictures([make_image(2)], min_pixels=3136, max_pixels=100_000, device=torch.device("cuda"))


def gpu_model(tiny_nova_dir, **kwargs):
    model = load(tiny_nova_dir, **kwargs).to("cuda")
    if not model.processor.preprocesses_on_device:
        pytest.skip("transformers' image processor here is the PIL one (no torchvision): it takes no device")
    return model


@needs_cuda
def test_pictures_preprocessed_on_the_gpu_match_the_cpu(tiny_nova_dir, monkeypatch):
    model = gpu_model(tiny_nova_dir)  # float32: the comparison sees the preprocessing, not bf16
    assert model.image_preprocessing_device() == model.device
    devices = []
    process = model.processor.process_pictures
    monkeypatch.setattr(model.processor, "process_pictures",
                        lambda images, **kwargs: devices.append(kwargs["device"]) or process(images, **kwargs))
    items = pictures(20)
    on_gpu = model.encode(items)
    assert devices and all(device == model.device for device in devices)
    model.gpu_image_preprocessing = "off"
    on_cpu = model.encode(items)
    assert devices[-1] is None
    assert F.cosine_similarity(on_gpu, on_cpu).min() > 0.9999
    model.gpu_image_preprocessing = "auto"
    embeds = model.get_image_embeddings([item["image"] for item in items[:4]])
    assert devices[-1] == model.device
    from_embeds = model.encode([{"image_embeds": e} for e in embeds])
    torch.testing.assert_close(from_embeds, model.encode([{"image": item["image"]} for item in items[:4]]),
                               rtol=0, atol=1e-5)


@needs_cuda
def test_gpu_preprocessed_batches_read_their_own_pixels(tiny_nova_dir):
    """Calls of several picture batches, serially and from two threads at once (a server's two batches in flight):
    each batch's pixels come from the side stream while earlier batches' kernels are queued; every call gets the
    vectors it gets alone."""
    model = gpu_model(tiny_nova_dir, dtype=torch.bfloat16)
    calls = [pictures(9 + 3 * i, seed=i) for i in range(8)]  # 2 to 4 batches of at most 8 pictures each
    expected = [model.encode(items) for items in calls]
    with ThreadPoolExecutor(max_workers=2) as pool:
        got = list(pool.map(model.encode, calls))
    for mine, theirs in zip(got, expected):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)
