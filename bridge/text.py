"""Text towers: frozen text encoders whose embedding space a projector learns to reach.

Five kinds, one interface (`encode(texts) -> (B, E)`, `embed_dim`, `context_length`):
`hf-clip` (CLIPTextModelWithProjection), `hf-siglip` (SigLIP text model), `open_clip` (the text tower of
any open_clip model; its image tower is dropped after loading), `sentence-transformers` (a model with a
modules.json, embedded as `SentenceTransformer.encode` does: its pooling, Dense layers, Normalize and max
length, read by sentence_modules.py) and `hf-encoder` (any Hugging Face encoder, mean pooled over real
tokens; one with a modules.json, as all-MiniLM-L6-v2 has, is built as a `sentence-transformers` tower).
Captions longer than the context are truncated and counted in `truncated`, never a crash.

Not here: anything trained. Towers are frozen by default; the projector meets them in their space.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers
from torch import nn
from tqdm.auto import tqdm

from bridge.config import ConfigError, TextConfig, resolve_model_name
from bridge.model_files import native_code_only
from bridge.sentence_modules import read_sentence_modules

log = logging.getLogger(__name__)

TOWERS: dict[str, type[TextTower]] = {}


def register_tower(kind: str):
    def register(cls):
        TOWERS[kind] = cls
        return cls

    return register


def build_text_tower(config: TextConfig) -> TextTower:
    if config.kind not in TOWERS:
        raise ConfigError(
            f"unknown text tower kind '{config.kind}'; known kinds: {', '.join(sorted(TOWERS))}"
        )
    if config.kind == "hf-encoder" and read_sentence_modules(config.name) is not None:
        # Pooling by hand would embed it differently from how it was trained: its modules decide.
        return TOWERS["sentence-transformers"](config)
    return TOWERS[config.kind](config)


class TextTower(nn.Module):
    """Base class: subclasses set `embed_dim`, `context_length` and implement `_encode_batch`."""

    embed_dim: int
    context_length: int

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.truncated = 0  # captions cut to the context length so far; training logs it

    def train(self, mode: bool = True) -> TextTower:
        return super().train(False)  # frozen: dropout stays off under a parent's .train()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """Texts -> (B, E) float32 embeddings on the CPU (not normalised; callers normalise)."""
        if isinstance(texts, str):
            texts = [texts]
        # Batching captions of similar length cuts the padding a batch computes on (~1.7x on MiniLM).
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        embeddings = torch.empty(len(texts), self.embed_dim)
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc="encoding captions", unit="batch", disable=not progress):
            chunk = order[start : start + batch_size]
            embeddings[chunk] = self._encode_batch([texts[i] for i in chunk]).float().cpu()
        return embeddings

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError


class _HFTokenizedTower(TextTower):
    """Shared tokenisation for the transformers towers: truncate to the context, count what was cut."""

    padding: str | bool = True

    def _load(self, model_class, name: str, subfolder: str = "", max_seq_length: int | None = None):
        path = resolve_model_name(name)
        where = {"subfolder": subfolder} if subfolder else {}
        with native_code_only(path):
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(
                path, trust_remote_code=False, **where
            )
            self.model = model_class.from_pretrained(path, trust_remote_code=False, **where)
        self.model.eval().requires_grad_(False)
        limits = [
            max_seq_length,
            self.tokenizer.model_max_length,
            getattr(self.model.config, "max_position_embeddings", None),
        ]
        limits = [n for n in limits if isinstance(n, int) and n < 100_000]
        self.context_length = min([self.config.max_length or 10**9, *limits])

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=True)["input_ids"]]
        self.truncated += sum(n > self.context_length for n in lengths)
        batch = self.tokenizer(
            texts, padding=self.padding, truncation=True, max_length=self.context_length, return_tensors="pt"
        )
        return {k: v.to(self.device) for k, v in batch.items()}


@register_tower("hf-encoder")
class HFEncoderTower(_HFTokenizedTower):
    def __init__(self, config: TextConfig):
        super().__init__(config)
        self._load(transformers.AutoModel, config.name)
        self.embed_dim = self.model.config.hidden_size

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        batch = self._tokenize(texts)
        tokens = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        return (tokens * mask).sum(1) / mask.sum(1).clamp(min=1)


@register_tower("sentence-transformers")
class SentenceTransformerTower(_HFTokenizedTower):
    """A sentence-transformers model as `SentenceTransformer.encode` runs it: the transformer, then the
    Pooling, Dense and Normalize modules its modules.json lists, truncating at its max_seq_length."""

    def __init__(self, config: TextConfig):
        super().__init__(config)
        modules = read_sentence_modules(config.name)
        if modules is None:
            raise ConfigError(
                f"text tower '{config.name}' has no modules.json, so it is not a sentence-transformers "
                "model; use kind 'hf-encoder' (mean pooling) for a plain transformers encoder"
            )
        self.stack = modules
        self._load(transformers.AutoModel, config.name, modules.subfolder, modules.max_seq_length)
        self.dense = nn.ModuleList(_dense_module(layer) for layer in modules.dense)
        width = len(modules.pooling) * self.model.config.hidden_size
        self.embed_dim = modules.dense[-1].weight.shape[0] if modules.dense else width

    def get_extra_state(self) -> torch.Tensor:
        # The pooling, activations, Normalize and max length decide the embeddings as much as the
        # weights do, so they are part of the state every fingerprint of this tower hashes.
        return torch.frombuffer(bytearray(self.stack.settings().encode()), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        pass  # the settings come from the model's own files, never from a state dict

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        if self.stack.lowercase:
            texts = [text.lower() for text in texts]
        batch = self._tokenize(texts)
        tokens = self.model(**batch).last_hidden_state
        embedding = torch.cat(
            [_pool(tokens, batch["attention_mask"], mode) for mode in self.stack.pooling], -1
        )
        for layer in self.dense:
            embedding = layer(embedding)
        return nn.functional.normalize(embedding, dim=-1) if self.stack.normalize else embedding


def _pool(tokens: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, L, D) token states and their (B, L) mask -> (B, D), as sentence-transformers' Pooling."""
    rows = torch.arange(len(tokens), device=tokens.device)
    if mode == "cls":
        return tokens[rows, mask.int().argmax(1)]  # the first real token: 0 unless padded on the left
    if mode == "lasttoken":
        last = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)
        return tokens[rows, last] * mask[rows, last, None]
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    if mode == "max":
        return tokens.masked_fill(weights == 0, float("-inf")).max(1).values
    if mode == "weightedmean":
        # Position weights 1, 2, ... from the first real token.
        positions = torch.arange(1, tokens.shape[1] + 1, device=tokens.device, dtype=tokens.dtype)
        weights = weights * (positions.view(1, -1, 1) - mask.int().argmax(1).view(-1, 1, 1))
    total = (tokens * weights).sum(1)
    count = weights.sum(1).clamp(min=1e-9)
    return total / (count.sqrt() if mode == "mean_sqrt_len_tokens" else count)


def _dense_module(layer) -> nn.Sequential:
    linear = nn.Linear(layer.weight.shape[1], layer.weight.shape[0], bias=layer.bias is not None)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(layer.weight))
        if layer.bias is not None:
            linear.bias.copy_(torch.from_numpy(layer.bias))
    activation = getattr(nn, layer.activation)()
    return nn.Sequential(linear, activation).requires_grad_(False)


@register_tower("hf-clip")
class HFCLIPTower(_HFTokenizedTower):
    def __init__(self, config: TextConfig):
        super().__init__(config)
        self._load(transformers.CLIPTextModelWithProjection, config.name)
        self.embed_dim = self.model.config.projection_dim

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        return self.model(**self._tokenize(texts)).text_embeds


@register_tower("hf-siglip")
class HFSigLIPTower(_HFTokenizedTower):
    # SigLIP was trained on captions padded to the full context; shorter padding changes its embeddings.
    padding = "max_length"

    def __init__(self, config: TextConfig):
        super().__init__(config)
        self._load(transformers.SiglipTextModel, config.name)
        # The pooled output leaves through the text head, whose width is projection_size (equal to
        # hidden_size in most checkpoints, but not in all; older configs have no projection_size).
        self.embed_dim = getattr(self.model.config, "projection_size", None) or self.model.config.hidden_size

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        batch = self._tokenize(texts)
        batch.pop("attention_mask", None)  # SigLIP's text model attends to the padding, as trained
        return self.model(**batch).pooler_output


@register_tower("open_clip")
class OpenCLIPTower(TextTower):
    def __init__(self, config: TextConfig):
        super().__init__(config)
        import open_clip

        pretrained = config.pretrained
        if pretrained and Path(pretrained).exists():
            pretrained = str(Path(pretrained).resolve())
            if not pretrained.endswith(".safetensors"):
                raise ConfigError(
                    f"open_clip checkpoint '{config.pretrained}' is not a .safetensors file; dinobridge never "
                    "unpickles checkpoints. Convert it with safetensors.torch.save_file(state_dict, ...)"
                )
        # Some open_clip models use a transformers text model and tokenizer, loaded without
        # trust_remote_code: the ones its config names are checked, and refused if they need code.
        with native_code_only(*_open_clip_hf_names(config.name)):
            model = open_clip.create_model(config.name, pretrained=pretrained)
            self.tokenizer = open_clip.get_tokenizer(config.name)
        model.visual = None  # only the text tower stays in memory
        self.model = model.eval().requires_grad_(False)
        self.context_length = min(config.max_length or 10**9, model.context_length)
        # The model itself always runs at its full context (its positional embedding and causal mask have
        # that length): a shorter max_length cuts the caption, then pads it with the tokenizer's pad id,
        # read off an empty caption since open_clip's tokenizers do not all pad with 0.
        self._model_context = model.context_length
        self._pad_id = int(self.tokenizer([""], context_length=model.context_length)[0, -1])
        # open_clip's model families keep the output width in different places; asking is exact for all.
        with torch.no_grad():
            self.embed_dim = model.encode_text(self._tokenize(["a"])).shape[-1]

    def _tokenize(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts, context_length=self.context_length)
        if self.context_length < self._model_context:
            padded = torch.full((len(texts), self._model_context), self._pad_id, dtype=tokens.dtype)
            padded[:, : self.context_length] = tokens
            tokens = padded
        return tokens

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        # One token more than the context tells whether a caption had to be cut: the slot past the end
        # holds a real token only when the caption did not fit.
        longer = self.tokenizer(texts, context_length=self.context_length + 1)
        self.truncated += int((longer[:, self.context_length] != self._pad_id).sum())
        return self.model.encode_text(self._tokenize(texts).to(self.device))


def _open_clip_hf_names(name: str) -> list[str]:
    """The transformers models an open_clip model's text tower loads, by name (none for most)."""
    import open_clip

    try:
        settings = (open_clip.get_model_config(name) or {}).get("text_cfg", {})
    except (OSError, ValueError):  # a hub config that cannot be fetched: create_model says so
        return []
    return [n for n in {settings.get("hf_model_name"), settings.get("hf_tokenizer_name")} if n]
