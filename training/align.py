"""Text-route training: fit a bridge's projector to a frozen text tower on image-caption pairs.

The encoder and the tower are frozen, so their outputs are computed once (training/cache.py) and every
step costs the projector alone. Batches are a pure function of (seed, micro-batch number), which is what
makes `resume` continue the very same loss curve. This file is the step body: what one batch computes;
the training loop around it (optimiser, schedule, accumulation, log, checkpoints, resume) is loop.py.

Not here: the model (bridge/model.py), data parsing (data.py), metrics (evaluate.py).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from bridge.adapters import DEFAULT_ADAPTER, check_adapter_name, copy_saved_adapters, saved_adapters
from bridge.config import ConfigError, RunConfig, TrainConfig
from bridge.model import TextBridge
from bridge.runtime import encode_settings, processes
from training.cache import CachedFeatures, EncodedFeatures, FeatureCache, TextCache
from training.data import HELD_OUT_CAP, held_out_split, load_pairs, parse_synthetic_spec, synthetic_pairs
from training.evaluate import retrieval_recall
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
from training.losses import LOSSES, dense_loss
from training.negatives import hard_negatives
from training.shards import check_cached, is_shard_spec, stream_shards

log = logging.getLogger(__name__)


@dataclass
class CaptionedFeatures:
    """Cached image features and the frozen tower's caption embeddings (normalised) for one split."""

    features: CachedFeatures
    captions: torch.Tensor  # (total captions, E)
    caption_image: torch.Tensor  # (total captions,): which image each caption belongs to
    first_caption: torch.Tensor  # (images,): index of each image's first caption
    caption_count: torch.Tensor  # (images,)
    # (total captions, groups x per group, E): each caption's hard negatives (training/negatives.py), zero
    # where a caption has no word of a group; None without `hard_negative_words`.
    negatives: torch.Tensor | None = None

    @classmethod
    def build(
        cls,
        features: CachedFeatures,
        text_cache: TextCache,
        hard_negative_words: list[list[str]] | None = None,
        negatives_per_group: int = 1,
    ) -> CaptionedFeatures:
        counts = torch.tensor([len(pair.captions) for pair in features.pairs], dtype=torch.long)
        texts = [caption for pair in features.pairs for caption in pair.captions]
        negatives = None
        if hard_negative_words:
            rows = hard_negatives(texts, hard_negative_words, per_group=negatives_per_group)
            edited = [caption for row in rows for caption in row]
            present = torch.tensor([caption is not None for caption in edited])
            negatives = torch.zeros(len(edited), text_cache.tower.embed_dim)
            negatives[present] = F.normalize(
                text_cache.embeddings([c for c in edited if c is not None]), dim=-1
            )
            negatives = negatives.view(len(texts), len(hard_negative_words) * negatives_per_group, -1)
        return cls(
            features,
            F.normalize(text_cache.embeddings(texts), dim=-1),
            torch.arange(len(counts)).repeat_interleave(counts),
            torch.cumsum(counts, 0) - counts,
            counts,
            negatives,
        )


@dataclass
class AlignmentData:
    train: CaptionedFeatures
    held_out: CaptionedFeatures
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (origin, reason) of unreadable images

    @classmethod
    def prepare(
        cls,
        bridge: TextBridge,
        data: str,
        config: TrainConfig,
        cache_dir: str | Path,
        image_root: str | None = None,
        progress: bool = True,
    ) -> AlignmentData:
        """Read the data set, split off the held-out pairs, and fill the caches.

        For `synthetic:N` the held-out scenes are new ones with distinct descriptions, so each caption
        has exactly one right image in the gallery; a file data set gives up `held_out` of its pairs
        (unset: a tenth, at most 500).
        """
        unusable: list[tuple[str, str]] = []  # shards' bad samples: no caption, a blank one, no image
        if is_shard_spec(data):  # streamed into the feature cache as they are read (training/shards.py)
            check_cached(data, config.cache)
            cache = FeatureCache(cache_dir, bridge.encoder)
            pairs, unusable = stream_shards(data, cache, config.num_workers, progress)
        else:
            pairs = load_pairs(data, image_root)
        if data.startswith("synthetic:"):
            _, seed = parse_synthetic_spec(data)
            # New scenes take nothing from training: unset, the held-out gallery is the full HELD_OUT_CAP.
            held_out = HELD_OUT_CAP if config.held_out is None else config.held_out
            count = int(held_out if held_out >= 1 else held_out * len(pairs))
            # Far past any training index, so no held-out scene was seen in training.
            train, held_out = pairs, synthetic_pairs(count, seed=seed, start=10**7, distinct=True)
        else:
            train, held_out = held_out_split(pairs, config.held_out, config.seed)
        if config.cache:
            feature_cache = FeatureCache(cache_dir, bridge.encoder)
            text_cache = TextCache(cache_dir, bridge.tower, progress)
            feature_cache.check_room(train + held_out)  # a cache the disk cannot hold fails before encoding
            parts = [
                feature_cache.features(split, workers=config.num_workers, progress=progress)
                for split in (train, held_out)
            ]
        else:  # nothing written: images are encoded as batches ask for them, captions embedded in memory
            text_cache = TextCache(None, bridge.tower, progress)
            parts = [
                EncodedFeatures.check(split, bridge.encoder, config.num_workers, progress)
                for split in (train, held_out)
            ]
        skipped = unusable + parts[0].failures + parts[1].failures
        if skipped:
            log.warning(
                "skipped %d of %d samples that could not be read",
                len(skipped),
                len(train) + len(held_out) + len(unusable),
            )
        if len(parts[0]) == 0:
            raise ConfigError(f"no training image of '{data}' could be read; see the warnings above")
        truncated_before = bridge.tower.truncated
        data_sets = [CaptionedFeatures.build(part, text_cache, config.hard_negative_words) for part in parts]
        truncated = bridge.tower.truncated - truncated_before
        if truncated:
            log.warning(
                "%d captions were longer than the text tower's %d-token context and were truncated",
                truncated,
                bridge.tower.context_length,
            )
        return cls(*data_sets, skipped)


class TrainableHead(nn.Module):
    """What training updates: the projector and the loss's temperature and bias, nothing frozen."""

    def __init__(self, bridge: TextBridge, loss: str = "infonce"):
        super().__init__()
        self.projector = bridge.projector
        self.logit_scale = bridge.logit_scale
        self.logit_bias = bridge.logit_bias
        # Only what the loss reads takes gradients: DDP waits for a gradient of every such parameter.
        self.logit_bias.requires_grad_(loss != "infonce")

    def forward(self, features, with_patches: bool = False):
        """Normalised global embeddings (B, E); with_patches: and per-patch ones (B, N, E) for the dense loss."""
        embedding, patches = self.projector(features, with_patches=with_patches)
        if not with_patches:
            return F.normalize(embedding, dim=-1)
        return F.normalize(embedding, dim=-1), F.normalize(patches, dim=-1)


@dataclass
class TrainResult:
    steps: int
    losses: list[float]  # one per optimiser step run in this call
    metrics: dict[str, float]  # held-out retrieval at the end
    skipped: list[tuple[str, str]]


def fit(
    bridge: TextBridge,
    data: AlignmentData,
    config: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train `bridge.projector` for `config.steps` steps (or `config.epochs` passes over the training
    pairs) through the training loop (loop.py); checkpoints under out_dir/checkpoints/. With
    `config.best_metric`, the bridge is left with the projector of the best held-out step."""
    loss_fn = loss_function(config.loss)
    config = with_epochs(config, len(data.train.features), "images")

    def micro_step(accelerator: Accelerator, head: nn.Module, batch: int) -> float:
        rank, world = accelerator.process_index, accelerator.num_processes
        images, rows = sample_batch(data.train, config, batch)
        texts = data.train.captions[rows].to(accelerator.device)
        # Each process embeds its slice of the global batch; the losses see the whole batch. Outside
        # autocast: without a cache (train.cache false) the frozen encoder runs here, as it filled one.
        features = data.train.features[process_slice(images, rank, world, "images")].to(accelerator.device)
        with accelerator.autocast():
            if config.dense_weight:
                embeddings, patches = head(features, with_patches=True)
                patches = gather_with_gradient(patches) if world > 1 else patches
            else:
                embeddings = head(features)
            embeddings = gather_with_gradient(embeddings) if world > 1 else embeddings
            unwrapped = accelerator.unwrap_model(head)
            args = (
                (unwrapped.logit_scale,)
                if config.loss == "infonce"
                else (unwrapped.logit_scale, unwrapped.logit_bias)
            )
            negatives = data.train.negatives
            negatives = None if negatives is None else negatives[rows].to(accelerator.device)
            loss = loss_fn(embeddings.float(), texts, *args, negatives)
            if config.dense_weight:  # grounding: captions against patches (losses.dense_loss)
                dense = dense_loss(patches.float(), texts, unwrapped.logit_scale, negatives)
                loss = loss + config.dense_weight * dense
        accelerator.backward(loss)
        return loss.item()

    final: dict[str, float] = {}  # the held-out metrics after the last step, once the loop has run it

    def after_step(done: int) -> dict[str, float] | None:
        if done == config.steps:
            final.update(evaluate_alignment(bridge, data.held_out))
            return final
        if config.eval_every and done % config.eval_every == 0:
            metrics = evaluate_alignment(bridge, data.held_out)
            if metrics:
                log.info("step %d: held-out text->image R@1 %.3f", done, metrics["text_to_image_R@1"])
            return metrics
        return None

    head = TrainableHead(bridge, config.loss).train()
    if bridge.adapter is not None and config.lora is not None:  # the adapter alone, and the temperature?
        bridge.adapters.train_only(bridge.adapter, config.lora.train_temperature)
        bridge.logit_bias.requires_grad_(config.lora.train_temperature and config.loss != "infonce")
    best = BestCheckpoint(config.best_metric) if config.best_metric != "none" else None
    losses = run_loop(head, micro_step, config, out_dir, resume, progress, "training", after_step, best)
    if best is not None and best.step is not None:  # the bridge now holds the best step's projector
        metrics = best.report()
        log.info(
            "kept step %d of %d: held-out %s %.4f (last step %.4f)",
            best.step,
            config.steps,
            best.metric,
            metrics[best.metric],
            metrics[f"last_{best.metric}"],
        )
        return TrainResult(config.steps, losses, metrics, data.skipped)
    # Measured in the loop (and sent to the trackers) unless there was no step left to run.
    metrics = final if losses else evaluate_alignment(bridge, data.held_out)
    return TrainResult(config.steps, losses, metrics, data.skipped)


def check_adapter_run(config: TrainConfig, base: str | Path | None, adapter: str | None) -> str | None:
    """The name of the adapter a run trains (None: it trains the projector), its settings checked."""
    if config.lora is None:
        if adapter is not None:
            raise ConfigError("--adapter names a LoRA adapter: add --lora (and --base DIR) to train one")
        return None
    if base is None:
        raise ConfigError("--lora trains an adapter on a trained bridge: give it with --base BRIDGE_DIR")
    name = check_adapter_name(adapter or DEFAULT_ADAPTER)
    if name in saved_adapters(base):
        raise ConfigError(
            f"base '{base}' already holds an adapter named '{name}'; choose another --adapter name"
        )
    return name


def loss_function(name: str):
    """The retrieval loss named by `train.loss`, or a ConfigError that lists the choices."""
    if name not in LOSSES:
        raise ConfigError(f"unknown loss '{name}'; choose one of {', '.join(LOSSES)}")
    return LOSSES[name]


def gather_with_gradient(local: torch.Tensor) -> torch.Tensor:
    """Every process's (b, ...) rows, in rank order, as one (world * b, ...) tensor gradients flow through.

    Every process then computes the same whole-batch loss, and the gradients each one sends back to the
    others' rows are summed into theirs: world times the true gradient of its own rows, which DDP's average
    over processes turns into exactly the one-process gradient of the same global batch (open_clip's
    `gather_with_grad`). The autograd all-gather is torch's own; `torch.distributed.nn`'s is deprecated.
    """
    from torch.distributed._functional_collectives import all_gather_single

    return all_gather_single(local.contiguous(), 0, torch.distributed.group.WORLD)


def sample_batch(
    data: CaptionedFeatures, config: TrainConfig, batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch number `batch`: (image indices, the row of one caption of each in `data.captions`).
    Images come in a fresh seeded permutation each epoch, each with one of its captions picked at random."""
    count = len(data.features)
    batch_size = min(config.batch_size, count)
    per_epoch = count // batch_size
    epoch, position = divmod(batch, per_epoch)
    order = epoch_order(count, config.seed, epoch)
    images = order[position * batch_size : (position + 1) * batch_size]
    pick = torch.Generator().manual_seed(config.seed * 1_000_003 + 7919 * batch + 1)
    offsets = (torch.rand(batch_size, generator=pick) * data.caption_count[images]).long()
    return images, data.first_caption[images] + offsets


@torch.no_grad()
def evaluate_alignment(
    bridge: TextBridge, data: CaptionedFeatures, batch_size: int = 512
) -> dict[str, float]:
    """Held-out retrieval recall, the whole held-out set as the gallery (projector in eval mode); {} with
    no held-out set (`train.held_out: 0`), where there is nothing to measure."""
    if len(data.features) == 0:
        return {}
    was_training = bridge.projector.training
    bridge.projector.eval()
    embeddings = [
        bridge.encode_image(data.features[list(range(i, min(i + batch_size, len(data.features))))]).cpu()
        for i in range(0, len(data.features), batch_size)
    ]
    bridge.projector.train(was_training)
    return retrieval_recall(torch.cat(embeddings), data.captions, data.caption_image.tolist())


def train_text_bridge(
    config: RunConfig,
    data: str,
    out_dir: str | Path,
    resume: bool = False,
    image_root: str | None = None,
    progress: bool = True,
    base: str | Path | None = None,
    adapter: str | None = None,
) -> tuple[TextBridge, TrainResult]:
    """The whole `dinobridge train`: build, cache, fit, save the bridge to out_dir.

    `base`: a saved bridge to start from instead of `config.bridge`; its whole projector trains on, or,
    with `config.train.lora` set, only a new LoRA adapter named `adapter` (bridge/adapters.py), saved in
    out_dir with the base, unchanged, and the adapters the base directory already held.

    A new run (no `resume`) into an `out_dir` that holds an earlier run is refused before any work; the
    config, the data and the image root are checked before anything is written there."""
    out_dir = Path(out_dir)
    adapter = check_adapter_run(config.train, base, adapter)
    settings = run_settings(config, data, image_root, base)
    if adapter is not None:
        settings["adapter"] = adapter
    cache_dir = run_cache_dir(out_dir, config.train.cache_dir)
    loss_function(config.train.loss)  # a config mistake fails here, not after the caches are filled
    check_report_to(config.train.report_to)
    state = processes()
    check_out_dir(out_dir, resume, cache_dir)
    check_resume(out_dir, settings, resume)
    state.wait_for_everyone()  # every process has looked at out_dir before the main one writes to it
    # Under `accelerate launch`, the main process fills the caches and owns the files; the others wait,
    # then read the caches it filled.
    with state.main_process_first():
        torch.manual_seed(config.train.seed)
        bridge = TextBridge.from_config(config.bridge) if base is None else TextBridge.from_pretrained(base)
        if adapter is not None:
            bridge.add_adapter(adapter, config.train.lora)
        # The cache fill runs the encoder on this process's device (a GPU when there is one), in float32
        # so that the features, and the encoder a bridge saves, stay exact.
        bridge.encoder.run_with(encode_settings(str(state.device), precision="fp32"))
        alignment = AlignmentData.prepare(
            bridge, data, config.train, cache_dir, image_root, progress and state.is_main_process
        )
        if state.is_main_process:
            write_run_config(out_dir, settings)
    result = fit(bridge, alignment, config.train, out_dir, resume=resume, progress=progress)
    if state.is_main_process:
        bridge.save_pretrained(out_dir)
        if adapter is not None:
            copy_saved_adapters(Path(base), out_dir, skip=adapter)
        (out_dir / "metrics.json").write_text(json.dumps(result.metrics, indent=2))
    state.wait_for_everyone()
    return bridge, result
