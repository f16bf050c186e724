"""VisionLLM: a frozen DINOv2/DINOv3 encoder, a trained projector and a transformers causal LM, LLaVA-style.

The user-facing model of the LLM route. A prompt holds one image placeholder (`<image>`) per image;
each placeholder is expanded into as many placeholder ids as the image has visual tokens, and the
projected encoder tokens replace their embeddings: exactly what transformers' LLaVA does, so a saved
VisionLLM exports to `LlavaForConditionalGeneration` with the same logits (bridge/llava_export.py).
Visual tokens are `hidden_states[encoder.layer]` with LLaVA's selection strategy ("default" drops the
CLS token, registers stay), or a 2x2 patch merge (4x fewer tokens, not exportable).

A saved VisionLLM is a directory with `config.json` (its kind and format version, and the settings), the
projector in `model.safetensors`, LoRA in peft's own format under `adapter/`, and `encoder/` and `llm/`
only for parts built from a config (which exist nowhere else). Hub models are recorded by name. Nothing
is unpickled, and no model folder's own Python code is ever run.

Not here: training (training/vlm.py), the export (llava_export.py), the offline LLM (offline_llm.py).
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import peft
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from bridge.config import (
    SELECT_STRATEGIES,
    ConfigError,
    LLMConfig,
    LoraSettings,
    VisionLLMConfig,
    from_dict,
    to_dict,
)
from bridge.hub import local_directory, push_model
from bridge.images import load_image
from bridge.model import ENCODER_DIR, WEIGHTS_FILE, load_projector_weights, read_safetensors, saved_part
from bridge.model_files import (
    CONFIG_FILE,
    VISION_LLM,
    native_code_only,
    read_saved_config,
    refuse_custom_code,
    saved_header,
)
from bridge.offline_llm import build_offline_llm
from bridge.projectors import build_projector
from bridge.queries import check_texts
from bridge.vision import FrozenEncoder, VisionFeatures

log = logging.getLogger(__name__)

LLM_DIR = "llm"  # where an LLM built from a config (and so existing nowhere else) is saved
ADAPTER_DIR = "adapter"  # LoRA adapters in peft's format
IGNORE = -100  # the label of a token the loss skips (a prompt's, an image's, padding), as in transformers

# An image as a user gives it: a PIL image or a file path (read by the project's one robust loader).
ImageLike = Image.Image | str | Path


class VisionLLM(nn.Module):
    """Frozen encoder -> projector -> visual tokens spliced into a causal LM at each `<image>`."""

    def __init__(
        self,
        config: VisionLLMConfig,
        encoder: FrozenEncoder,
        projector: nn.Module,
        llm: transformers.PreTrainedModel,
        tokenizer: transformers.PreTrainedTokenizerBase,
    ):
        super().__init__()
        if config.select_strategy not in SELECT_STRATEGIES:
            raise ConfigError(
                f"select_strategy '{config.select_strategy}' is not one of {', '.join(SELECT_STRATEGIES)}"
            )
        if not hasattr(projector, "visual_tokens"):
            raise ConfigError(
                f"projector '{config.projector.kind}' makes text-route embeddings, not LLM tokens; "
                "use 'mlp' (LLaVA's, exportable) or 'patch-merge' (4x fewer tokens) for the LLM route"
            )
        self.config = config
        self.encoder = encoder
        self.projector = projector
        self.llm = llm
        self.tokenizer = tokenizer
        self.image_token = config.llm.image_token
        self.image_token_id: int = tokenizer.convert_tokens_to_ids(self.image_token)

    @classmethod
    def from_config(
        cls, config: VisionLLMConfig, dtype: torch.dtype = torch.float32, quantization: str = "none"
    ) -> VisionLLM:
        """A new VisionLLM with an untrained projector and a frozen LLM (LoRA attached if configured).
        `config` is copied, never changed: the widths found go into the model's own `config`.

        The frozen encoder and LLM are loaded in `dtype` (the LLM as 4-bit NF4 with `quantization`
        "4bit", computing in `dtype`); the projector, and LoRA adapters added later, stay float32."""
        config = copy.deepcopy(config)
        encoder = FrozenEncoder.from_config(config.encoder).to(dtype)
        llm, tokenizer = load_llm(config.llm, dtype, quantization)
        hidden_size = llm.config.get_text_config().hidden_size
        if config.projector.out_dim is not None and config.projector.out_dim != hidden_size:
            raise ConfigError(
                f"projector outputs {config.projector.out_dim}-d tokens but the LLM "
                f"'{config.llm.name or 'offline default'}' has hidden size {hidden_size}; set "
                f"projector.out_dim to {hidden_size} (or null) and train the projector for this LLM"
            )
        projector = build_projector(config.projector, encoder.hidden_size, hidden_size)
        config.projector.in_dim, config.projector.out_dim = encoder.hidden_size, hidden_size
        llm.requires_grad_(False)
        model = cls(config, encoder, projector, llm, tokenizer)
        if config.lora is not None:
            model.add_lora(config.lora)
        return model

    # ---- LoRA -------------------------------------------------------------------------------------------

    def add_lora(self, settings: LoraSettings | None = None) -> None:
        """Attach trainable LoRA adapters to the LLM's attention and MLP projections (never the encoder:
        peft wraps only the language model). The base weights stay frozen."""
        settings = settings or LoraSettings()
        if isinstance(self.llm, peft.PeftModel):
            raise ConfigError("this VisionLLM already has LoRA adapters; merge them first (merged_llm)")
        # peft keeps the adapters float32 over a bf16/fp16 base (autocast_adapter_dtype), as LLaVA trains them.
        lora = peft.LoraConfig(
            r=settings.r,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=list(settings.target_modules),
            task_type="CAUSAL_LM",
        )
        try:
            self.llm = peft.get_peft_model(self.llm, lora)
        except ValueError as error:
            raise ConfigError(
                f"LoRA target_modules {settings.target_modules} do not fit this LLM: {error}"
            ) from None
        self.config.lora = settings

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the LLM's activations in the backward pass instead of keeping them (training only).

        Non-reentrant checkpointing, so gradients reach the LoRA weights inside a checkpointed layer even
        though the layer's text-token inputs come from a frozen embedding; the input embedding is also
        made to require gradients, which the reentrant variant (and peft's k-bit preparation) needs."""
        options = {"use_reentrant": False}
        if hasattr(self.llm, "activation_checkpointing_enable"):  # transformers 5's name for it
            self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
        self.llm.enable_input_require_grads()

    def merged_llm(self) -> transformers.PreTrainedModel:
        """The LLM with LoRA merged into its weights (a copy; this model keeps its adapters)."""
        if isinstance(self.llm, peft.PeftModel):
            return copy.deepcopy(self.llm).merge_and_unload()
        return self.llm

    def base_llm(self) -> transformers.PreTrainedModel:
        """The LLM without its adapters (a copy when there are some), for saving the frozen base."""
        if isinstance(self.llm, peft.PeftModel):
            return copy.deepcopy(self.llm).unload()
        return self.llm

    # ---- images -> visual tokens --------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.projector.parameters()).device

    def features(self, images: Sequence[ImageLike] | VisionFeatures) -> VisionFeatures:
        if isinstance(images, VisionFeatures):
            return images.to(self.device)
        pictures = [load_image(image) if isinstance(image, str | Path) else image for image in images]
        return self.encoder(self.encoder.preprocessing([p.convert("RGB") for p in pictures]))

    def visual_tokens(self, images: Sequence[ImageLike] | VisionFeatures) -> torch.Tensor:
        """Images (or their cached features) -> (n_images, T, llm hidden size) LLM input tokens."""
        features = self.features(images)
        dtype = next(self.projector.parameters()).dtype
        return self.projector.visual_tokens(features.to(dtype=dtype), self.config.select_strategy)

    def tokens_per_image(self) -> int:
        grid = self.encoder.grid_hw
        features = VisionFeatures(
            torch.zeros(1, self.encoder.hidden_size),
            torch.zeros(1, self.encoder.num_registers, self.encoder.hidden_size),
            torch.zeros(1, grid[0] * grid[1], self.encoder.hidden_size),
            grid,
            self.encoder.layer,
        ).to(self.device)
        with torch.no_grad():
            return self.visual_tokens(features).shape[1]

    # ---- text ---------------------------------------------------------------------------------------------

    def chat_prompt(self, question: str, images: int = 1, history: Sequence[dict] = ()) -> str:
        """The tokenizer's chat template applied to a user turn: `images` placeholders, then the question."""
        if self.tokenizer.chat_template is None:
            raise ConfigError(
                f"the tokenizer of '{self.config.llm.name}' has no chat template; use an instruction-tuned "
                "LLM or pass a ready prompt with <image> placeholders to generate()"
            )
        content = f"{self.image_token}\n" * images + question
        messages = [*history, {"role": "user", "content": content}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def expand_placeholders(self, ids: Sequence[int], tokens_per_image: int) -> list[int]:
        """One placeholder id -> `tokens_per_image` of them, as LlavaProcessor writes its prompts."""
        out: list[int] = []
        for token in ids:
            out.extend([token] * tokens_per_image if token == self.image_token_id else [token])
        return out

    def count_placeholders(self, prompts: Sequence[str], images_per_prompt: Sequence[int]) -> None:
        """Refuse prompts whose placeholders and images do not pair up one to one."""
        if len(prompts) != len(images_per_prompt):
            raise ValueError(f"{len(prompts)} prompts but image lists for {len(images_per_prompt)}")
        for number, (prompt, count) in enumerate(zip(prompts, images_per_prompt, strict=True)):
            placeholders = prompt.count(self.image_token)
            if placeholders != count:
                raise ValueError(
                    f"prompt {number} has {placeholders} {self.image_token} placeholder(s) but {count} "
                    f"image(s) were given for it; put one {self.image_token} in the prompt per image, in order"
                )

    def batch(
        self, prompts: Sequence[str], images: Sequence[Sequence[ImageLike]], padding_side: str = "left"
    ) -> dict[str, torch.Tensor]:
        """Tokenised, placeholder-expanded, padded prompts and their images' visual tokens, in order."""
        counts = [len(group) for group in images]
        self.count_placeholders(prompts, counts)
        flat = [image for group in images for image in group]
        return self.tokenize(prompts, counts, self.visual_tokens(flat) if flat else None, padding_side)

    def tokenize(
        self,
        prompts: Sequence[str],
        images_per_prompt: Sequence[int],
        visual_tokens: torch.Tensor | None,
        padding_side: str = "left",
    ) -> dict[str, torch.Tensor]:
        """`batch` for visual tokens already made ((n_images, T, D), e.g. from cached features)."""
        self.count_placeholders(prompts, images_per_prompt)
        per_image = visual_tokens.shape[1] if visual_tokens is not None else 0
        ids = [
            self.expand_placeholders(self.tokenizer(prompt, add_special_tokens=False).input_ids, per_image)
            for prompt in prompts
        ]
        input_ids, attention_mask = pad(ids, self.tokenizer.pad_token_id or 0, padding_side)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "visual_tokens": visual_tokens}

    # ---- the LLM ------------------------------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor, visual_tokens: torch.Tensor | None) -> torch.Tensor:
        """(B, L) ids with expanded placeholders and (n_images, T, D) visual tokens -> (B, L, D) embeddings."""
        is_image = input_ids == self.image_token_id
        text_ids = input_ids.masked_fill(is_image, 0)  # placeholders may lie past a resized vocabulary
        embeddings = self.llm.get_input_embeddings()(text_ids)
        count = int(is_image.sum())
        given = 0 if visual_tokens is None else visual_tokens.shape[0] * visual_tokens.shape[1]
        if count != given:
            raise ValueError(
                f"the batch has {count} image placeholder positions but {given} visual tokens; give one "
                "image per placeholder and expand each placeholder with expand_placeholders"
            )
        if count == 0:
            return embeddings
        visual = visual_tokens.to(embeddings.dtype).reshape(-1, embeddings.shape[-1])
        return embeddings.masked_scatter(is_image[..., None], visual)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        visual_tokens: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> transformers.modeling_outputs.CausalLMOutputWithPast:
        """Logits (B, L, vocab); with `labels` (-100 where no loss), the mean next-token loss."""
        return self._run_llm(
            input_ids,
            attention_mask,
            visual_tokens,
            labels=None if labels is None else labels.to(self.device),
        )

    def _run_llm(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        visual_tokens: torch.Tensor | None,
        **options,
    ) -> transformers.modeling_outputs.CausalLMOutputWithPast:
        """The LLM over the ids with each image's visual tokens spliced in; `options` go to its forward."""
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        # Positions count real tokens only, so a left-padded prompt reads as it would alone.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return self.llm(
            inputs_embeds=self.embed(input_ids, visual_tokens),
            attention_mask=attention_mask,
            position_ids=position_ids,
            **options,
        )

    def answer_loss(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        visual_tokens: torch.Tensor | None,
        labels: torch.Tensor,
    ) -> torch.Tensor:
        """`forward(...).loss`, the mean next-token loss over the labelled tokens, with the vocabulary's
        logits computed only at the positions that predict a label.

        The full logits are (B, L, vocab) in float32 for the loss: for a Qwen2-0.5B-shaped LLM, 4
        conversations of 320 tokens (256 of them an image's) and its 151,936-token vocabulary, 0.78 GB and
        a quarter of the step's arithmetic, almost all of it at image and prompt positions, which have no
        label. transformers' `logits_to_keep` (the sequence positions to keep) applies the output layer to
        the positions where some conversation of the batch has a label; an LLM whose forward has no
        `logits_to_keep` gets the full logits.
        """
        labels = labels.to(self.device)
        base = self.llm.get_base_model() if isinstance(self.llm, peft.PeftModel) else self.llm
        if "logits_to_keep" not in inspect.signature(base.forward).parameters:
            return self(input_ids, attention_mask, visual_tokens, labels).loss
        # Position p predicts token p + 1. Positions are shared by the batch: every transformers release
        # with `logits_to_keep` takes a 1-D index (a per-conversation mask only came later).
        targets = labels[:, 1:]
        positions = (targets != IGNORE).any(0).nonzero().squeeze(1)
        kept = self._run_llm(input_ids, attention_mask, visual_tokens, logits_to_keep=positions)
        logits, targets = kept.logits, targets[:, positions]  # (B, kept positions, vocab), (B, kept)
        # In float32 whatever the LLM computes in, as transformers' own loss does.
        return nn.functional.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE
        )

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str] | str,
        images: Sequence[Sequence[ImageLike]] | Sequence[ImageLike] = (),
        max_new_tokens: int = 32,
        **generate_options,
    ) -> list[str] | str:
        """Prompts with `<image>` placeholders and their images -> the generated replies (greedy unless
        generate_options say otherwise). One prompt and a flat image list gives one reply string."""
        single = isinstance(prompts, str)
        if single:
            prompts, images = [prompts], [list(images)]
        elif not images:
            images = [[] for _ in prompts]
        replies = self.generate_from(self.batch(prompts, images), max_new_tokens, **generate_options)
        return replies[0] if single else replies

    @torch.no_grad()
    def generate_from(
        self, inputs: dict[str, torch.Tensor], max_new_tokens: int = 32, **generate_options
    ) -> list[str]:
        """Replies to a left-padded batch made by `batch` or `tokenize`."""
        input_ids, attention_mask = (
            inputs["input_ids"].to(self.device),
            inputs["attention_mask"].to(self.device),
        )
        embeddings = self.embed(input_ids, inputs["visual_tokens"])
        options = {"do_sample": False, "max_new_tokens": max_new_tokens, **generate_options}
        output = self.llm.generate(
            inputs_embeds=embeddings,
            attention_mask=attention_mask,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            **options,
        )
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in output]

    def chat(self, question: str, images: Sequence[ImageLike] = (), max_new_tokens: int = 32) -> str:
        """One user turn about `images` (placeholders put before the question) -> the reply."""
        (question,) = check_texts([question], "question", '"What is in the image?"')
        return self.generate(self.chat_prompt(question, len(images)), list(images), max_new_tokens)

    # ---- save / load --------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = from_dict(VisionLLMConfig, to_dict(self.config))
        for part in (config.encoder, config.llm):
            if part.name and Path(part.name).exists():
                part.name = str(Path(part.name).resolve())  # a local path survives a move
        if config.encoder.name is None:
            self.encoder.save_pretrained(directory / ENCODER_DIR)
            config.encoder.name, config.encoder.image_size = ENCODER_DIR, None
        if config.llm.name is None:
            # Built from a config (and maybe trained from scratch): its weights exist nowhere else.
            self.base_llm().save_pretrained(directory / LLM_DIR)
            self.tokenizer.save_pretrained(directory / LLM_DIR)
            config.llm.name = LLM_DIR
        saved = {**saved_header(VISION_LLM), "vlm": to_dict(config)}
        (directory / CONFIG_FILE).write_text(json.dumps(saved, indent=2) + "\n")
        weights = {
            f"projector.{k}": v.detach().cpu().contiguous() for k, v in self.projector.state_dict().items()
        }
        save_file(weights, directory / WEIGHTS_FILE)
        if isinstance(self.llm, peft.PeftModel):
            # Embedding rows grown for the placeholder are rebuilt on loading; no need to copy the matrix.
            self.llm.save_pretrained(directory / ADAPTER_DIR, save_embedding_layers=False)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        dtype: torch.dtype = torch.float32,
        quantization: str = "none",
        *,
        revision: str | None = None,
    ) -> VisionLLM:
        """The VisionLLM `save_pretrained` wrote to `directory` (frozen parts in `dtype`, as from_config),
        or pushed to the Hub repo id `directory` (at `revision`; through huggingface_hub's cache,
        bridge/hub.py). What it cannot load (another kind of model, a newer format, a damaged or
        mismatched file, a model needing custom code) is refused in one line naming the file and the fix."""
        directory = local_directory(directory, revision)
        saved = read_saved_config(directory, VISION_LLM)
        config_file = directory / CONFIG_FILE
        config = from_dict(VisionLLMConfig, saved["vlm"], str(config_file))
        for part, local, what in ((config.encoder, ENCODER_DIR, "encoder"), (config.llm, LLM_DIR, "LLM")):
            if part.name == local:
                part.name = saved_part(directory, local, what)
            if part.name is not None:
                refuse_custom_code(part.name)  # before seconds go into loading the other part
        lora, config.lora = config.lora, None
        model = cls.from_config(config, dtype, quantization)
        model.load_projector(directory / WEIGHTS_FILE, config_file)
        if (directory / ADAPTER_DIR).is_dir():
            model.llm = peft.PeftModel.from_pretrained(model.llm, directory / ADAPTER_DIR)
            model.config.lora = lora
        return model

    def push_to_hub(self, repo_id: str, private: bool = False, revision: str | None = None, **options) -> str:
        """Upload this VisionLLM to the Hub repo `repo_id` with a model card; returns the commit's URL.
        `dinobridge push DIR` pushes a training run's directory, with its record (bridge/hub.py)."""
        return push_model(self, repo_id, private=private, revision=revision, **options)

    def load_projector(self, path: str | Path, config_file: Path | None = None) -> None:
        """Load the projector's weights from a safetensors file; `config_file`, when they come with one, is
        named if they do not fit the projector it describes."""
        load_projector_weights(
            self.projector, self.config.projector, read_safetensors(path), path, config_file
        )


def load_llm(
    config: LLMConfig, dtype: torch.dtype = torch.float32, quantization: str = "none"
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """A causal LM in `dtype` (or 4-bit, see `quantized`) and its tokenizer by hub name or local path (or
    the offline default), with the image placeholder in the vocabulary."""
    if config.name is None:
        if quantization != "none":
            raise ConfigError(
                f"train.quantization '{quantization}' loads a pretrained LLM in 4 bits, but llm.name is not "
                "set (the offline LLM is built from a config); set llm.name, or train.quantization: none"
            )
        return build_offline_llm(config, dtype)
    with native_code_only(config.name):
        tokenizer = transformers.AutoTokenizer.from_pretrained(config.name, trust_remote_code=False)
        llm = transformers.AutoModelForCausalLM.from_pretrained(
            config.name, dtype=dtype, trust_remote_code=False, **quantized(quantization, dtype)
        )
    if config.image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [config.image_token]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    vocabulary = llm.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocabulary:
        # New rows set to the mean of the old ones, deterministically, so a reload gives the same model.
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            for matrix in {
                id(m): m for m in (llm.get_input_embeddings(), llm.get_output_embeddings())
            }.values():
                matrix.weight[vocabulary:] = matrix.weight[:vocabulary].mean(0)
    if quantization != "none":
        # QLoRA's preparation: norms and embeddings in float32, the 4-bit layers left as they are.
        llm = peft.prepare_model_for_kbit_training(llm, use_gradient_checkpointing=False)
    return llm, tokenizer


def quantized(quantization: str, dtype: torch.dtype) -> dict:
    """from_pretrained's options for `quantization`: "4bit" is QLoRA's NF4 with double quantization,
    computing in `dtype`, on this process's GPU (bitsandbytes needs CUDA; training/vlm.py refuses a CPU
    before anything is loaded)."""
    if quantization == "none":
        return {}
    try:
        import bitsandbytes  # noqa: F401  (transformers needs it for the 4-bit layers)
    except ImportError:
        raise ConfigError(
            f"train.quantization '{quantization}' needs bitsandbytes; pip install \"dinobridge[qlora]\""
        ) from None
    settings = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    return {"quantization_config": settings, "device_map": {"": torch.cuda.current_device()}}


def pad(
    sequences: Sequence[Sequence[int]], value: int, side: str = "left"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists of ids -> (B, L) ids padded with `value` and the (B, L) attention mask."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        span = slice(length - len(sequence), length) if side == "left" else slice(0, len(sequence))
        ids[row, span] = torch.tensor(sequence, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask
