"""Training config: `configs/train/<model>/<method>.yaml` -> typed sections, and the two QLoRA converters.

The converters are the whole boundary to bitsandbytes / peft (as in trl's `get_quantization_config` /
`get_peft_config`): everything else reads our own typed config.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fibreflow.core.config import Strict, load_config, project_root, torch_dtype
from fibreflow.core.errors import ConfigError
from pydantic import Field, NonNegativeInt, PositiveInt, model_validator

if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

# "auto": bfloat16 where this machine computes it natively, else float32 (see `torch_dtype`)
Dtype = Literal["auto", "float32", "bfloat16", "float16"]


class ModelEntry(Strict):
    """One base model of the catalogue (`configs/models.yaml`)."""

    path: str | None = None  # hub id or local folder (GPU machines)
    gguf_package: str | None = None  # or: a PyPI package shipping a GGUF, converted once to an HF folder
    max_context: PositiveInt
    description: str = ""

    @model_validator(mode="after")
    def _one_source(self) -> ModelEntry:
        if (self.path is None) == (self.gguf_package is None):
            raise ValueError("give exactly one of path / gguf_package")
        return self


class Generation(Strict):
    """How the served assistant answers unless a request says otherwise (the logged model, the serving spec, the
    model server's default, the frontend endpoints): one place for the project's answer defaults."""

    max_new_tokens: PositiveInt = 128
    temperature: float = Field(0.0, ge=0.0, le=2.0)


class Catalogue(Strict):
    models: dict[str, ModelEntry]
    generation: Generation = Generation()


class Quantization(Strict):
    """4-bit loading via bitsandbytes; `load_in_4bit: false` trains LoRA on an unquantized base."""

    load_in_4bit: bool = True
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Dtype = "auto"
    quant_storage: Dtype = "bfloat16"  # only the container of the packed 4-bit weights


class Lora(Strict):
    r: PositiveInt = 16
    alpha: PositiveInt = 32
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"
    from_layer: NonNegativeInt = 0  # adapters on decoder layers from this one up (0: all): the backward pass stops
    # at the lowest adapted layer, so the layers below it cost a forward pass only. Not with gradient
    # checkpointing: peft then makes the embeddings' output require grad, and the backward reaches every layer

    @model_validator(mode="after")
    def _layers_need_module_names(self) -> Lora:
        if self.from_layer and isinstance(self.target_modules, str):
            raise ValueError("from_layer needs target_modules as a list of module names (peft), not 'all-linear'")
        return self


class DataSection(Strict):
    dataset: Literal["terminology", "grounded_qa", "assistant"] = "terminology"
    mix: list[Literal["terminology", "grounded_qa", "assistant"]] = Field(default_factory=list)  # + their train rows
    version: str | None = None  # a built dataset version; None = the latest build (configs/data.yaml)
    max_train_rows: PositiveInt | None = None
    max_eval_rows: PositiveInt | None = None


class Optim(Strict):
    epochs: float = Field(3.0, gt=0)
    max_steps: int = -1  # > 0 overrides epochs
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    max_grad_norm: float = Field(1.0, gt=0)
    batch_size: PositiveInt = 8  # padded: examples per micro-batch; packed: rows of up to seq_len tokens
    grad_accum: PositiveInt = 1
    seq_len: PositiveInt = 512  # an example's tokens at most (the rest is cut)
    packing: bool = True  # padding-free: examples concatenated, attention kept inside each example
    pack_len: PositiveInt | None = None  # packed rows' tokens at most (None: seq_len); a longer example is a row of
    # its own. A packed row's attention costs per token in proportion to its length: short rows train faster
    chat_turns: PositiveInt = 1  # training questions per chat: the system turn and tool block once per chat, not
    # once per question (training.data.chats); validation rows stay single questions
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile (inductor; needs a C++ compiler on CPU): the element-wise ops fused
    seed: int = 42


class Eval(Strict):
    every_steps: PositiveInt = 25
    early_stopping_patience: PositiveInt | None = 3  # evals without improvement before stopping; None = never
    early_stopping_threshold: float = 0.0


class Checkpoint(Strict):
    every_steps: PositiveInt = 25  # must be a multiple of eval.every_steps (the best checkpoint is kept)
    keep: PositiveInt = 2


class Heldout(Strict):
    """After training: base vs tuned on held-out phrasings (test split), key-term containment with a paired CI."""

    enabled: bool = True
    known: int = Field(120, ge=0)  # known-term questions sampled from the test split
    unknown: int = Field(8, ge=0)  # made-up-term questions: must answer "I don't know"
    batch_size: PositiveInt = 16
    max_new_tokens: PositiveInt = 96


class Tracking(Strict):
    experiment: str = "fibreflow-train"
    log_model: bool = True
    system_metrics: bool = True


class TrainConfig(Strict):
    model: str
    model_path: str | None = None  # overrides the catalogue entry's source (a local folder or hub id)
    dtype: Dtype = "auto"  # dtype of the unquantized parts (and of the whole base without 4-bit)
    quantization: Quantization | None = Quantization()
    lora: Lora = Lora()
    data: DataSection = DataSection()
    optim: Optim = Optim()
    eval: Eval = Eval()
    checkpoint: Checkpoint = Checkpoint()
    heldout: Heldout = Heldout()
    tracking: Tracking = Tracking()
    output_dir: str = "var/train"
    merge: bool = False  # also write a merged (LoRA folded in, unquantized) model for serving

    @model_validator(mode="after")
    def _steps(self) -> TrainConfig:
        if self.checkpoint.every_steps % self.eval.every_steps:
            raise ValueError("checkpoint.every_steps must be a multiple of eval.every_steps")
        if self.optim.pack_len is not None and self.optim.pack_len > self.optim.seq_len:
            raise ValueError("optim.pack_len must be at most optim.seq_len")
        return self

    def config_hash(self) -> str:
        """Identity of the training itself (not of what happens after it): same hash, same adapter."""
        blob = json.dumps(self.model_dump(mode="json", exclude={"heldout", "tracking", "merge"}), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_catalogue() -> Catalogue:
    return load_config(Catalogue, "models")


def model_entry(cfg: TrainConfig) -> ModelEntry:
    models = load_catalogue().models
    if cfg.model not in models:
        raise ConfigError(f"model: {cfg.model!r} is not in configs/models.yaml (have: {', '.join(sorted(models))})")
    entry = models[cfg.model]
    return entry.model_copy(update={"path": cfg.model_path, "gguf_package": None}) if cfg.model_path else entry


def load_train_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A train config file (a relative path: from the cwd if it exists there, else the project root) + overrides."""
    p = Path(path)
    return load_config(TrainConfig, p.stem, overrides, path=p.resolve() if p.exists() else p)


def default_train_config() -> Path:
    return project_root() / "configs" / "train" / "smollm2-135m-instruct" / "qlora.yaml"


def bnb_config(q: Quantization | None) -> BitsAndBytesConfig | None:
    """Our quantization section -> `BitsAndBytesConfig` (None: no quantization)."""
    if q is None or not q.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(q.compute_dtype),
        bnb_4bit_quant_storage=torch_dtype(q.quant_storage),
    )


def lora_config(lora: Lora, num_layers: int) -> LoraConfig:
    """Our lora section -> peft `LoraConfig` for causal-LM fine-tuning of a model with `num_layers` decoder layers."""
    from peft import LoraConfig

    if lora.from_layer >= num_layers:
        raise ConfigError(
            f"lora.from_layer: {lora.from_layer}, but the model has {num_layers} layers (0-{num_layers - 1})"
        )
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias=lora.bias,
        layers_to_transform=list(range(lora.from_layer, num_layers)) if lora.from_layer else None,
        task_type="CAUSAL_LM",
    )
