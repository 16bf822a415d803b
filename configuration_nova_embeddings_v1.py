"""Configuration of nova-embeddings-v1: a Qwen2.5-VL backbone plus the embedding fields.

The backbone fields are exactly Qwen2.5-VL's (inherited); what this module adds says how items are
turned into prompts (task prefixes, image prompt, pixel limits) and how hidden states become vectors
(pooling, projector size, Matryoshka dimensions). Defaults are jina-embeddings-v4's training setup.
"""

from __future__ import annotations

from transformers import Qwen2_5_VLConfig

# jina-embeddings-v4's training prefixes: "Query: " for queries (and every text-matching input),
# "Passage: " for documents. Bare "retrieval"/"code" mean the query side, as in jina.
DEFAULT_TASK_PROMPTS: dict[str, str] = {
    "retrieval": "Query: ",
    "retrieval.query": "Query: ",
    "retrieval.passage": "Passage: ",
    "text-matching": "Query: ",
    "code": "Query: ",
    "code.query": "Query: ",
    "code.passage": "Passage: ",
}
DEFAULT_TASK_NAMES: list[str] = ["retrieval", "text-matching", "code"]
DEFAULT_MATRYOSHKA_DIMS: list[int] = [128, 256, 512, 1024, 2048]


class NovaEmbeddingsV1Config(Qwen2_5_VLConfig):
    """Qwen2.5-VL config with the fields that turn the backbone into an embedding model.

    Fields (beyond Qwen2.5-VL's):
        task_names: the adapter tasks; a task such as ``retrieval.query`` routes to ``retrieval``.
        task_prompts: text prefix per task (keys are every accepted task string).
        default_task: task used when neither the call nor the item names one.
        multi_vector_projector_dim: width of the per-token (late interaction) vectors.
        matryoshka_dims: allowed ``dimensions`` for single vectors (the last is the full width).
        pool_instruction_tokens: if True, the instruction's system turn is pooled too (default: attended only).
        image_prompt: the user text jina put after an image with no text of its own.
        min_pixels / max_pixels: default resize limits of the image processor (jina: 4 to 768 image tokens).
        max_image_pixels: decoded images larger than this are refused (decompression-bomb guard).
        max_length: longest token sequence accepted for one item.
        adapters_dir: folder (relative to the repository) holding one PEFT adapter per task.
    """

    model_type = "nova_embeddings_v1"

    task_names: list[str] | None = None
    task_prompts: dict[str, str] | None = None
    default_task: str = "retrieval"
    multi_vector_projector_dim: int = 128
    matryoshka_dims: list[int] | None = None
    pool_instruction_tokens: bool = False
    image_prompt: str = "Describe the image."
    min_pixels: int = 3136
    max_pixels: int = 602112
    max_image_pixels: int = 40_000_000
    max_length: int = 32768
    adapters_dir: str = "adapters"

    def __post_init__(self, **kwargs):
        if self.task_names is None:
            self.task_names = list(DEFAULT_TASK_NAMES)
        if self.task_prompts is None:
            self.task_prompts = dict(DEFAULT_TASK_PROMPTS)
        if self.matryoshka_dims is None:
            self.matryoshka_dims = list(DEFAULT_MATRYOSHKA_DIMS)
        super().__post_init__(**kwargs)
        self._check_embedding_fields()

    def _check_embedding_fields(self) -> None:
        """Fail at load time, not at the first encode, when the embedding fields contradict each other."""
        if self.default_task not in self.task_prompts:
            raise ValueError(
                f"default_task {self.default_task!r} is not one of task_prompts: {sorted(self.task_prompts)}"
            )
        for task in self.task_prompts:
            if self.adapter_task(task) not in self.task_names:
                raise ValueError(f"task {task!r} routes to {self.adapter_task(task)!r}, not in task_names {self.task_names}")
        for name in ("min_pixels", "max_pixels", "max_image_pixels", "max_length"):  # plain ints only (processing's
            value = getattr(self, name)  # per-call _positive_int also takes numpy ints, which a saved config.json cannot)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"config.{name} must be a positive int, got {value!r}")
        if not self.min_pixels <= self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) must not exceed max_pixels ({self.max_pixels})")

    @staticmethod
    def adapter_task(task: str) -> str:
        """The adapter a task string routes to: ``retrieval.passage`` -> ``retrieval``."""
        return task.split(".", 1)[0]

    @property
    def embedding_dim(self) -> int:
        """Width of the single vector: the language model's hidden size."""
        return self.text_config.hidden_size


__all__ = ["NovaEmbeddingsV1Config"]
