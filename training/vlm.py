"""LLM-route training, LLaVA's recipe: stage 1 fits the projector alone on image-caption data; stage 2
fits the projector and LoRA adapters on the LLM on conversations. The loss counts answer tokens only.

The encoder is frozen, so its features come from the feature cache (training/cache.py) and a step costs
the projector and the LLM; `train.cache: false` runs the encoder on each batch instead. Data is LLaVA JSON,
caption data, webdataset shards (training/shards.py) or synthetic scenes. Batches are a pure function of
(seed, micro-batch number); the training loop around the step body here (optimiser, schedule,
accumulation, log, checkpoints, resume, the best held-out step kept) is loop.py, the same as the text
route's, so `--resume` continues the same loss curve. A batch can run as sub-batches
of similar length (`train.sub_batches`): the same gradient, less padding. Stage 0 trains the whole LLM
with the projector: only for the demo's tiny LLM, which starts with no language.

Under `accelerate launch` each process runs its slice of every global batch through the trained parts
wrapped for data parallelism (`TrainableParts`), its loss weighted by the global batch's answer tokens, so
the averaged gradient is the one-process gradient of the same batch. The frozen base can be loaded in
bf16/fp16 (`train.precision`) or 4-bit (`train.quantization`, QLoRA, CUDA only), the LLM's activations
recomputed in the backward pass (`train.gradient_checkpointing`); docs/llm-route.md has the recipe.

Not here: the model (bridge/vlm.py), data parsing (data.py), the demo (vlm_demo.py).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import peft
import torch
from accelerate import Accelerator
from torch import nn

from bridge.config import ConfigError, VLMRunConfig, VLMTrainConfig
from bridge.runtime import processes
from bridge.vision import VisionFeatures
from bridge.vlm import IGNORE, VisionLLM, pad
from training.cache import CachedFeatures, EncodedFeatures, FeatureCache
from training.data import (
    IMAGE_PLACEHOLDER,
    Conversation,
    DataError,
    held_out_split,
    load_conversations,
    parse_synthetic_spec,
    synthetic_conversations,
    synthetic_held_out_count,
)
from training.evaluate import answer_accuracy
from training.loop import (
    BestCheckpoint,
    check_out_dir,
    check_report_to,
    check_resume,
    epoch_order,
    process_slice,
    run_cache_dir,
    run_loop,
    run_settings,
    with_epochs,
    write_run_config,
)
from training.shards import check_cached, is_shard_spec, stream_conversation_shards

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # train.precision


@dataclass
class EncodedConversation:
    ids: list[int]  # one id per image placeholder, expanded at batch time
    labels: list[int]  # = ids on answer tokens, IGNORE elsewhere
    image_rows: list[int]  # rows of its images in the CachedFeatures, in placeholder order
    conversation: Conversation


@dataclass
class ConversationData:
    conversations: list[EncodedConversation]
    features: CachedFeatures | EncodedFeatures
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (origin, reason)

    @classmethod
    def prepare(
        cls,
        model: VisionLLM,
        conversations: Sequence[Conversation],
        cache_dir: str | Path | None,
        workers: int = 0,
        progress: bool = True,
    ) -> ConversationData:
        """Encode every image once (cached) and tokenise every conversation; conversations with an
        image the loader rejects are skipped with the reason. `cache_dir` None (`train.cache: false`):
        every image is decoded once to find those, and batches are encoded as they are asked for."""
        pairs = list({pair.key: pair for c in conversations for pair in c.pairs()}.values())
        if cache_dir is None:
            features = EncodedFeatures.check(pairs, model.encoder, workers, progress)
        else:
            features = FeatureCache(cache_dir, model.encoder).features(
                pairs, workers=workers, progress=progress
            )
        row_of = {pair.key: row for row, pair in enumerate(features.pairs)}
        failed = dict(features.failures)
        encoded, skipped = [], []
        for conversation in conversations:
            keys = [pair.key for pair in conversation.pairs()]
            if not all(key in row_of for key in keys):
                reasons = [
                    failed.get(p.origin, "unreadable") for p in conversation.pairs() if p.key not in row_of
                ]
                skipped.append((conversation.origin, "; ".join(reasons)))
                continue
            ids, labels = encode_conversation(model, conversation.turns)
            encoded.append(EncodedConversation(ids, labels, [row_of[k] for k in keys], conversation))
        if skipped:
            log.warning("skipped %d conversations with unreadable images", len(skipped))
        if not encoded:
            raise DataError("no conversation has all its images readable; see the warnings above")
        return cls(encoded, features, skipped)

    def lengths(self, tokens_per_image: int) -> tuple[int, ...]:
        """Tokens per conversation, each image placeholder counted as the visual tokens it expands to."""
        return tuple(len(c.ids) + (tokens_per_image - 1) * len(c.image_rows) for c in self.conversations)


def encode_conversation(model: VisionLLM, turns: Sequence[tuple[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of the chat-templated conversation and labels that keep only the assistant's replies
    (with the template's end-of-turn token, so the model learns to stop)."""
    tokenizer = model.tokenizer
    turns = [(role, text.replace(IMAGE_PLACEHOLDER, model.image_token)) for role, text in turns]
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    messages: list[dict] = []
    for role, text in turns:
        if role == "assistant":
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            messages.append({"role": role, "content": text})
            full = tokenizer.apply_chat_template(messages, tokenize=False)
            if not (prompt.startswith(rendered) and full.startswith(prompt)):
                raise ConfigError(
                    "the tokenizer's chat template does not render a conversation as a prefix of its "
                    "continuation, so answer tokens cannot be told apart; use a standard chat template"
                )
            before = tokenizer(prompt[len(rendered) :], add_special_tokens=False).input_ids
            answer = tokenizer(full[len(prompt) :], add_special_tokens=False).input_ids
            ids += before + answer
            labels += [IGNORE] * len(before) + answer
            rendered = full
        else:
            messages.append({"role": role, "content": text})
    return ids, labels


class TrainableParts(nn.Module):
    """What a stage updates, by name, so checkpoints hold those tensors and nothing frozen; its forward
    pass is the VisionLLM's loss, so that the module the loop wraps for data parallelism is the one that
    runs, and its gradients are averaged over the processes."""

    def __init__(self, model: VisionLLM):
        super().__init__()
        self.projector = model.projector
        self.llm = nn.ParameterDict(
            {name.replace(".", "__"): p for name, p in model.llm.named_parameters() if p.requires_grad}
        )
        # Held outside the module tree: wrapping, moving and checkpointing touch the trained parts only.
        object.__setattr__(self, "model", model)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        features: VisionFeatures | None = None,
    ) -> torch.Tensor:
        """The mean loss over the answer tokens of a batch made by `training_inputs`."""
        visual = self.model.visual_tokens(features) if features is not None else None
        loss = self.model.answer_loss(input_ids, attention_mask, visual, labels)
        if visual is None:
            # A batch without images leaves the projector without a gradient, and DDP waits for one of
            # every trained parameter: a zero gradient keeps the processes in step.
            loss = loss + 0.0 * sum(p.sum() for p in self.projector.parameters())
        return loss


def check_settings(model: VisionLLM, config: VLMTrainConfig) -> None:
    """Refuse training settings that cannot run on `model`; `train_vlm` asks before it writes anything."""
    check_stage(model, config.stage, config.freeze_projector)
    if config.sub_batches < 1:
        raise ConfigError(f"train.sub_batches is {config.sub_batches}; give 1 (whole batches) or more")
    world = processes().num_processes
    if config.batch_size % world:
        raise ConfigError(
            f"train.batch_size {config.batch_size} (the global batch) does not split over {world} "
            f"processes; set train.batch_size to a multiple of {world}"
        )
    check_engine()


def check_engine() -> None:
    """Refuse the engines that shard parameters (FSDP, DeepSpeed ZeRO-3): they would shard the trained
    parts apart from the LLM's modules that use them. DDP and ZeRO-2 keep every parameter whole."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        raise ConfigError(
            "train-vlm does not run under FSDP (it would shard the LoRA weights away from the LLM's layers); "
            "launch with DDP (configs/accelerate/ddp-bf16.yaml) or DeepSpeed ZeRO-2 "
            "(configs/accelerate/deepspeed-zero2.yaml)"
        )
    if os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        raise ConfigError(
            "train-vlm does not run under DeepSpeed ZeRO-3 (it would shard the LoRA weights away from the "
            "LLM's layers); use ZeRO-2 (configs/accelerate/deepspeed-zero2.yaml)"
        )


def check_quantization(config: VLMTrainConfig) -> None:
    """Refuse 4-bit loading where bitsandbytes cannot run it, before any model is loaded."""
    if config.quantization == "none":
        return
    if not torch.cuda.is_available() or processes().device.type != "cuda":
        raise ConfigError(
            f"train.quantization '{config.quantization}' (QLoRA) needs a CUDA GPU: bitsandbytes' 4-bit "
            "layers do not run on a CPU; set train.quantization: none (and train.precision: bf16 to halve "
            "the LLM's memory)"
        )


def check_stage(model: VisionLLM, stage: int, freeze_projector: bool = False) -> None:
    if stage not in (0, 1, 2):
        raise ConfigError(f"train.stage {stage} is not 0 (tiny LLM from scratch), 1 (projector) or 2 (LoRA)")
    if stage == 1 and freeze_projector:
        raise ConfigError(
            "stage 1 trains the projector alone; train.freeze_projector leaves nothing to train"
        )
    if stage == 0 and isinstance(model.llm, peft.PeftModel):
        raise ConfigError("stage 0 trains the whole LLM; start it from a model without LoRA adapters")


def set_stage(model: VisionLLM, stage: int, freeze_projector: bool = False) -> None:
    """Freeze and unfreeze for a stage: 0 projector + whole LLM, 1 projector, 2 projector + LoRA; with
    `freeze_projector`, the same without the projector."""
    check_stage(model, stage, freeze_projector)
    if stage == 2 and not isinstance(model.llm, peft.PeftModel):
        model.add_lora(model.config.lora)
    for name, parameter in model.llm.named_parameters():
        parameter.requires_grad_(stage == 0 or (stage == 2 and "lora_" in name))
    model.projector.requires_grad_(not freeze_projector)


@dataclass
class VLMTrainResult:
    steps: int
    losses: list[float]
    metrics: dict[str, float]  # held-out answer accuracy per kind, of the model kept
    skipped: list[tuple[str, str]]
    # The kept step's held-out metrics, `best_metric`, `best_step`, `last_step` and the last step's figure
    # (BestCheckpoint.report); empty without held-out data or with train.best_metric: none.
    best: dict = field(default_factory=dict)


def fit_vlm(
    model: VisionLLM,
    data: ConversationData,
    held_out: ConversationData | None,
    config: VLMTrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
) -> VLMTrainResult:
    """Train for `config.steps` steps (or `config.epochs` passes over the conversations) at
    `config.stage` through the training loop (loop.py); checkpoints under out_dir/checkpoints/. With
    `held_out`, it is evaluated every `config.eval_every` steps and at the last, and `config.best_metric`
    leaves the model with the trained tensors of the best step."""
    check_settings(model, config)
    config = with_epochs(config, len(data.conversations), "conversations")
    set_stage(model, config.stage, config.freeze_projector)
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    lengths = data.lengths(model.tokens_per_image())

    def micro_step(accelerator: Accelerator, trainable: nn.Module, batch: int) -> float:
        indices = batch_indices(
            len(data.conversations), config, batch, lengths if config.group_by_length else None
        )
        return backward_batch(trainable, data, indices, lengths, config.sub_batches, accelerator)

    def after_step(done: int) -> dict[str, float] | None:
        if done != config.steps and not (config.eval_every and done % config.eval_every == 0):
            return None
        metrics = {"loss": held_out_loss(model, held_out)}
        if config.best_metric == "accuracy":  # generating every answer: only when it picks the step
            metrics["accuracy"] = evaluate_answers(model, held_out)["all"]
        log.info("step %d: %s", done, ", ".join(f"held-out {k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    evaluated = held_out is not None and len(held_out.conversations) > 0
    best = BestCheckpoint(config.best_metric, lower_is_better=config.best_metric == "loss")
    best = best if evaluated and config.best_metric != "none" else None
    model.to(processes().device).train()
    losses = run_loop(
        TrainableParts(model),
        micro_step,
        config,
        out_dir,
        resume,
        progress,
        f"stage {config.stage}",
        after_step if evaluated else None,
        best,
    )
    model.eval()
    metrics = evaluate_answers(model, held_out) if evaluated else {}
    report = best.report() if best is not None and best.step is not None else {}
    if report:  # the model now holds the best step's trained tensors
        log.info(
            "kept step %d of %d: held-out %s %.4f (last step %.4f)",
            best.step,
            config.steps,
            best.metric,
            report[best.metric],
            report[f"last_{best.metric}"],
        )
    return VLMTrainResult(config.steps, losses, metrics, data.skipped, report)


def batch_indices(
    count: int, config: VLMTrainConfig, batch: int, lengths: Sequence[int] | None = None
) -> torch.Tensor:
    """Conversations of micro-batch number `batch`: a fresh seeded permutation each epoch, a function of
    the number alone.

    With `lengths` (tokens per conversation), grouping by length as LLaVA does: each run of LENGTH_GROUP
    batches of the permutation is sorted by length, rounded up to LENGTH_BUCKET tokens, before it is cut
    into batches, and the epoch's batches come in a seeded order. A batch pads to lengths like its own (a
    batch of questions does not pay for one long caption) and every conversation is still seen once an
    epoch.
    """
    batch_size = min(config.batch_size, count)
    epoch, position = divmod(batch, count // batch_size)
    if lengths is None:
        order = epoch_order(count, config.seed, epoch)
        return order[position * batch_size : (position + 1) * batch_size]
    return _grouped_batches(tuple(lengths), batch_size, config.seed, epoch)[position]


LENGTH_GROUP = 64
# Sorted by exact length, conversations of one kind end up in batches of their own (the demo's colour,
# shape and position questions are 27, 28 and 26-27 tokens long), and training swung between kinds:
# held-out shape 0.64 exact against 0.79 in 8-token buckets, same demo settings. Within a bucket the
# order stays the epoch's random one.
LENGTH_BUCKET = 8


@functools.lru_cache(maxsize=2)
def _grouped_batches(lengths: tuple[int, ...], batch_size: int, seed: int, epoch: int) -> torch.Tensor:
    """(batches, batch_size): the epoch's permutation, sorted by length within each group of batches."""
    per_epoch = len(lengths) // batch_size
    order = epoch_order(len(lengths), seed, epoch)[: per_epoch * batch_size]
    size = (torch.tensor(lengths)[order] + LENGTH_BUCKET - 1) // LENGTH_BUCKET
    groups = []
    for start in range(0, len(order), LENGTH_GROUP * batch_size):
        chunk = slice(start, start + LENGTH_GROUP * batch_size)
        groups.append(order[chunk][torch.argsort(size[chunk], stable=True)])
    batches = torch.cat(groups).view(per_epoch, batch_size)
    # a stream of its own: seed * 1_000_003 + epoch + 1 would be the next epoch's permutation
    shuffle = torch.randperm(
        per_epoch, generator=torch.Generator().manual_seed(2**40 + seed * 1_000_003 + epoch)
    )
    return batches[shuffle]


def backward_batch(
    trainable: nn.Module,
    data: ConversationData,
    indices: torch.Tensor,
    lengths: Sequence[int],
    parts: int,
    accelerator: Accelerator,
) -> float:
    """Forward and backward passes of this process's slice of the global batch `indices`, as at most
    `parts` sub-batches (sub_batches), their gradients adding up in the trained parameters; returns the
    global batch's mean loss.

    `trainable` is TrainableParts, wrapped for data parallelism under N processes. Each sub-batch's loss
    is weighted by its share of the GLOBAL batch's answer tokens, and DDP averages the gradients over the
    processes, so the loss each process backpropagates is `world` times its share: the averaged gradient
    is then exactly the one-process gradient of the whole batch.
    """
    world, model = accelerator.num_processes, accelerator.unwrap_model(trainable).model
    mine = process_slice(indices, accelerator.process_index, world, "conversations")
    runs = sub_batches(mine, lengths, parts, data, total=answer_tokens(data, indices))
    loss = torch.zeros((), device=accelerator.device)
    for number, (part, share) in enumerate(runs):
        # Gradients are averaged once, after the last sub-batch; every earlier one only adds its own.
        wrapped = isinstance(trainable, nn.parallel.DistributedDataParallel)
        last = number == len(runs) - 1
        # Outside autocast: without a cache (train.cache: false) the frozen encoder runs here, as in a fill.
        inputs = training_inputs(model, data, part)
        with contextlib.nullcontext() if last or not wrapped else accelerator.no_sync(trainable):
            with accelerator.autocast():
                part_loss = trainable(**inputs) * share
            accelerator.backward(part_loss * world)
        loss += part_loss.detach().float()
    return (accelerator.reduce(loss, "sum") if world > 1 else loss).item()


def answer_tokens(data: ConversationData, indices: Sequence[int]) -> int:
    """The answer tokens the loss counts in the conversations `indices` (the loss predicts every position
    but the first, so a label there would not count)."""
    return sum(label != IGNORE for i in indices for label in data.conversations[int(i)].labels[1:])


def sub_batches(
    indices: torch.Tensor,
    lengths: Sequence[int],
    parts: int,
    data: ConversationData,
    total: int | None = None,
) -> list[tuple[list[int], float]]:
    """The batch `indices` as at most `parts` sub-batches of similar length, each with its share of the
    answer tokens: of the batch's own, or of `total` (the global batch's, when `indices` is one process's
    slice of it).

    A sub-batch pads only to its own longest conversation. Its mean loss times its share, summed over the
    sub-batches, is the whole batch's mean loss, so the gradient is the same (to float rounding) for fewer
    padding tokens computed.
    """
    chosen = [int(i) for i in indices]
    if parts == 1 and total is None:  # the batch as it was drawn
        return [(chosen, 1.0)]
    if parts == 1:
        runs = [chosen]
    else:
        chosen.sort(key=lambda i: lengths[i])
        runs = [chosen[start:end] for start, end in fewest_padding_runs([lengths[i] for i in chosen], parts)]
    answers = [answer_tokens(data, run) for run in runs]
    total = (sum(answers) if total is None else total) or 1
    return [(run, count / total) for run, count in zip(runs, answers, strict=True) if count]


def fewest_padding_runs(sizes: Sequence[int], parts: int) -> list[tuple[int, int]]:
    """(start, end) of at most `parts` consecutive runs of the ascending `sizes` whose padded total (each
    run padded to its last, longest, size) is least; cut only where the size changes, so a batch of a
    few distinct lengths costs little to search."""
    ends = [j for j in range(1, len(sizes)) if sizes[j] != sizes[j - 1]] + [len(sizes)]
    # after k rounds, cost[e] is the least padded total of sizes[:ends[e]] in at most k + 1 runs
    cost = [end * sizes[end - 1] for end in ends]
    runs = [[(0, end)] for end in ends]
    for _ in range(parts - 1):
        next_cost, next_runs = list(cost), list(runs)
        for e, end in enumerate(ends):
            for b in range(e):
                total = cost[b] + (end - ends[b]) * sizes[end - 1]
                if total < next_cost[e]:
                    next_cost[e], next_runs[e] = total, [*runs[b], (ends[b], end)]
        cost, runs = next_cost, next_runs
    return runs[-1]


def training_batch(model: VisionLLM, data: ConversationData, indices) -> dict[str, torch.Tensor]:
    """Right-padded ids, mask and labels with each placeholder expanded, and the images' visual tokens:
    the VisionLLM's own inputs."""
    inputs = training_inputs(model, data, indices)
    features = inputs.pop("features")
    return inputs | {"visual_tokens": model.visual_tokens(features) if features is not None else None}


def training_inputs(model: VisionLLM, data: ConversationData, indices) -> dict:
    """Right-padded ids, mask and labels with each placeholder expanded, and the images' cached features:
    TrainableParts' inputs (the projector runs inside the module trained)."""
    chosen = [data.conversations[int(i)] for i in indices]
    rows = [row for item in chosen for row in item.image_rows]
    features = data.features[rows] if rows else None
    per_image = model.tokens_per_image() if rows else 0
    ids, labels = [], []
    for item in chosen:
        ids.append(model.expand_placeholders(item.ids, per_image))
        labels.append(
            [
                label
                for token, label in zip(item.ids, item.labels, strict=True)
                for label in ([IGNORE] * per_image if token == model.image_token_id else [label])
            ]
        )
    input_ids, attention_mask = pad(ids, model.tokenizer.pad_token_id or 0, side="right")
    label_ids, _ = pad(labels, IGNORE, side="right")
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": label_ids,
        "features": features,
    }


@torch.no_grad()
def held_out_loss(model: VisionLLM, data: ConversationData, batch_size: int = 32) -> float:
    """The mean loss over every answer token of `data` (a batch's mean loss weighted by its answer
    tokens), the model in eval mode: what training minimises, measured on held-out conversations."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, answer_tokens(data, range(len(data.conversations)))
    for start in range(0, len(data.conversations), batch_size):
        indices = range(start, min(start + batch_size, len(data.conversations)))
        loss = model.answer_loss(**training_batch(model, data, indices))
        total += loss.float().item() * answer_tokens(data, indices)
    model.train(was_training)
    return total / max(tokens, 1)


@torch.no_grad()
def evaluate_answers(
    model: VisionLLM, data: ConversationData, batch_size: int = 64, max_new_tokens: int = 40
) -> dict[str, float]:
    """Greedy replies to each held-out conversation's last question, compared with its answer, per kind
    (exact match after lower-casing and trimming end punctuation)."""
    was_training = model.training
    model.eval()
    replies, answers, kinds = [], [], []
    for start in range(0, len(data.conversations), batch_size):
        chosen = data.conversations[start : start + batch_size]
        prompts, counts = [], []
        for item in chosen:
            turns = item.conversation.turns
            last = max(i for i, (role, _) in enumerate(turns) if role == "assistant")
            messages = [
                {"role": role, "content": text.replace(IMAGE_PLACEHOLDER, model.image_token)}
                for role, text in turns[:last]
            ]
            prompts.append(
                model.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            )
            counts.append(sum(m["content"].count(model.image_token) for m in messages))
            answers.append(turns[last][1])
            kinds.append(item.conversation.kind or "answer")
        rows = [row for item, count in zip(chosen, counts, strict=True) for row in item.image_rows[:count]]
        visual = model.visual_tokens(data.features[rows]) if rows else None
        replies += model.generate_from(model.tokenize(prompts, counts, visual), max_new_tokens)
    model.train(was_training)
    return answer_accuracy(replies, answers, kinds)


def train_vlm(
    config: VLMRunConfig,
    data: str,
    out_dir: str | Path,
    resume: bool = False,
    image_root: str | None = None,
    base: str | Path | None = None,
    progress: bool = True,
) -> tuple[VisionLLM, VLMTrainResult]:
    """The whole `dinobridge train-vlm`: build (or load `base`, a saved VisionLLM from an earlier
    stage), cache, fit, evaluate on held-out conversations, and save the VisionLLM to out_dir.

    A new run (no `resume`) into an `out_dir` that holds an earlier run (or the `base` itself) is refused
    before any work; the base, the config and the data are checked before anything is written there."""
    out_dir = Path(out_dir)
    settings = run_settings(config, data, image_root, base)
    cache_dir = run_cache_dir(out_dir, config.train.cache_dir)
    state = processes()
    check_out_dir(out_dir, resume, cache_dir)
    check_resume(out_dir, settings, resume)
    state.wait_for_everyone()  # every process has looked at out_dir before the main one writes to it
    check_quantization(config.train)
    check_report_to(config.train.report_to)
    if is_shard_spec(data):
        check_cached(data, config.train.cache)
    torch.manual_seed(config.train.seed)
    # The base and the config are read before the cache is the first thing written (shards are read into
    # it). The frozen encoder and LLM load in the training precision; the trained parts stay float32.
    loading = {"dtype": DTYPES[config.train.precision], "quantization": config.train.quantization}
    model = (
        VisionLLM.from_pretrained(base, **loading) if base else VisionLLM.from_config(config.vlm, **loading)
    )
    if base and config.vlm.lora is not None and model.config.lora is None:
        model.config.lora = config.vlm.lora
    check_settings(model, config.train)
    # Under `accelerate launch` the main process reads the data and fills the cache; the others wait, then
    # read the cache it filled (and, for shards, its manifest of the samples).
    with state.main_process_first():
        train_data, held_out, skipped = prepare_conversations(
            model, data, config.train, cache_dir, image_root, progress and state.is_main_process
        )
        if state.is_main_process:
            write_run_config(out_dir, settings)
    if base is None:  # a fresh projector; a resumed run overwrites it from its checkpoint anyway
        sample = list(range(min(512, len(train_data.features))))
        standardise_projector_input(model, train_data.features[sample])
    result = fit_vlm(model, train_data, held_out, config.train, out_dir, resume=resume, progress=progress)
    result.skipped = skipped
    if state.is_main_process:
        model.save_pretrained(out_dir)
        (out_dir / "metrics.json").write_text(json.dumps(result.metrics | result.best, indent=2))
    state.wait_for_everyone()
    return model, result


def prepare_conversations(
    model: VisionLLM,
    data: str,
    config: VLMTrainConfig,
    cache_dir: Path,
    image_root: str | None = None,
    progress: bool = True,
) -> tuple[ConversationData, ConversationData | None, list[tuple[str, str]]]:
    """Read `data`, split off the held-out conversations and encode their images: (training, held-out
    or None, every sample skipped as (origin, reason)).

    Shards stream into the feature cache as they are read (training/shards.py). For synthetic:N the
    held-out scenes are new ones, never seen in training; other data gives up `held_out` of its
    conversations (unset: a tenth, at most 500)."""
    unusable: list[tuple[str, str]] = []  # shards' bad samples: no conversation, no image, bad turns
    if is_shard_spec(data):
        cache = FeatureCache(cache_dir, model.encoder)
        conversations, unusable = stream_conversation_shards(data, cache, config.num_workers, progress)
    else:
        conversations = load_conversations(data, image_root)
    if data.startswith("synthetic:"):
        _, seed = parse_synthetic_spec(data)
        count = synthetic_held_out_count(config.held_out, len(conversations))
        train, held_out = conversations, synthetic_conversations(count, seed=seed, start=10**7)
    else:
        train, held_out = held_out_split(conversations, config.held_out, config.seed, "conversations")
    features = cache_dir if config.cache else None  # None: the encoder runs on each batch instead
    train_data = ConversationData.prepare(model, train, features, config.num_workers, progress)
    held_out_data = (
        ConversationData.prepare(model, held_out, features, config.num_workers, progress)
        if held_out
        else None
    )
    skipped = unusable + train_data.skipped + (held_out_data.skipped if held_out_data else [])
    return train_data, held_out_data, skipped


def frozen_state(model: VisionLLM) -> dict[str, np.ndarray]:
    """Copies of every tensor that training must leave alone: the encoder and the LLM's base weights."""
    state = {f"encoder.{k}": v.detach().cpu().numpy().copy() for k, v in model.encoder.state_dict().items()}
    state |= {
        f"llm.{k}": v.detach().cpu().numpy().copy()
        for k, v in model.llm.state_dict().items()
        if "lora_" not in k
    }
    return state


@torch.no_grad()
def standardise_projector_input(model: VisionLLM, features: VisionFeatures) -> None:
    """Fold the per-dimension mean and spread of the projector's input tokens (measured on `features`)
    into its first linear layer, so a fresh projector starts on standardised tokens.

    A frozen encoder's tokens share large constant components; what tells images apart is a small part
    of their variance, and the LLM's per-token RMS norm hides it further. Folded into the weights, the
    projector stays a plain Linear-GELU-Linear (exportable to LLaVA as it is).
    """
    first = model.projector.mlp[0]
    seen: list[torch.Tensor] = []
    hook = first.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    try:
        model.visual_tokens(features)
    finally:
        hook.remove()
    tokens = seen[0].reshape(-1, first.in_features).float()
    mean, spread = tokens.mean(0), tokens.std(0) + 1e-6
    first.weight /= spread
    first.bias -= first.weight @ mean
