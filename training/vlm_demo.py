"""`dinobridge demo-vlm`: the LLM route end to end on the offline default, in minutes on a CPU.

No LLM can be downloaded here, so the demo makes its own: a tiny Llama-shaped decoder with the
synthetic world's word tokenizer, trained from scratch together with the projector (stage 0) to caption
scenes and answer colour, shape and position questions. That model is then frozen, and a LoRA
fine-tune (stage 2: projector + adapters) teaches it a question type it has never seen, counting,
with the old questions replayed so it keeps them. Held-out scenes (never trained on) are asked every
question they can answer, before and after; the frozen weights are compared bitwise after the
fine-tune. The result is saved as a VisionLLM.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bridge.config import VLMRunConfig
from bridge.synthetic import SyntheticWorld
from bridge.vlm import VisionLLM
from training.data import IMAGE_PLACEHOLDER, Conversation, synthetic_conversations
from training.vlm import ConversationData, fit_vlm, frozen_state, standardise_projector_input

log = logging.getLogger(__name__)

ORIGINAL_KINDS = ("colour", "shape", "position")
NEW_KIND = "count"


@dataclass
class VLMDemoSettings:
    """The best sizes measured so far within about 10 minutes on a 2-core CPU (README: LLM route).
    They do not reach the issue's accuracy targets yet: the projector does not learn shape, which the
    frozen random encoder's tokens hold only non-linearly, in the budget (README: "Why it learns slowly")."""

    base_scenes: int = 6000  # stage 0: captions and colour/shape/position questions
    base_steps: int = 3000
    base_lr: float = 1e-3  # 3e-3 learnt slower (colour 0.45 against 0.62 after 1,500 steps)
    lora_scenes: int = 3000  # stage 2: counting, with the old questions replayed
    lora_steps: int = 600
    lora_lr: float = 1e-3
    held_out_scenes: int = 200  # each asked every question it has one answer to
    batch_size: int = 32
    llm_layers: int = 2  # of the offline default's width-128 decoder (4): half the cost a step


@dataclass
class VLMDemoResult:
    before: dict[str, float]  # held-out accuracy per question kind after stage 0
    after: dict[str, float]  # ... after the LoRA fine-tune
    frozen_unchanged: bool
    seconds: dict[str, float] = field(default_factory=dict)
    out_dir: Path = Path()

    def report(self) -> str:
        lines = ["dinobridge demo-vlm: offline default (tiny DINOv2 + tiny Llama trained here)", ""]
        lines.append(f"{'held-out accuracy':<20}{'before LoRA':>12}{'after LoRA':>12}")
        for kind in (*ORIGINAL_KINDS, NEW_KIND):
            lines.append(f"{kind:<20}{self.before.get(kind, 0):>12.3f}{self.after.get(kind, 0):>12.3f}")
        lines.append("")
        lines.append(
            f"frozen encoder and base LLM weights bitwise unchanged by LoRA: {self.frozen_unchanged}"
        )
        lines.append("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items()))
        lines.append(f"VisionLLM (patch-merge projector): {self.out_dir / 'vlm'}")
        return "\n".join(lines)


def every_question(scenes: int, seed: int = 0, start: int = 10**7) -> list[Conversation]:
    """Every question each held-out scene has one answer to (scenes past any training index)."""
    conversations = []
    for scene in SyntheticWorld(seed).scenes(start, scenes):
        for question, answer, kind in scene.questions():
            turns = [("user", f"{IMAGE_PLACEHOLDER}\n{question}"), ("assistant", answer)]
            conversations.append(Conversation([scene], turns, f"held-out {scene.key}", kind))
    return conversations


def run_vlm_demo(
    out_dir: str | Path = "demo-vlm-out", settings: VLMDemoSettings | None = None, progress: bool = True
) -> VLMDemoResult:
    # Matrices this small gain nothing from a second thread, and when another process shares the cores,
    # torch's spinning worker threads collapse throughput (measured: 8.3 steps/s on one thread against
    # 0.15 on two, under load). One thread for the demo; the caller's setting is restored after.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(Path(out_dir), settings or VLMDemoSettings(), progress)
    finally:
        torch.set_num_threads(threads)


def _run(out_dir: Path, settings: VLMDemoSettings, progress: bool) -> VLMDemoResult:
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    config = VLMRunConfig()
    # The 2x2 patch merge: 16 visual tokens a scene instead of 64, which more than halves every step on
    # a CPU. (It cannot be exported to LLaVA; the notebook and tests export the 'mlp' default.)
    config.vlm.projector.kind = "patch-merge"
    config.vlm.llm.architecture["num_hidden_layers"] = settings.llm_layers
    config.train.batch_size = settings.batch_size
    config.train.checkpoint_every = 0
    torch.manual_seed(config.train.seed)
    model = VisionLLM.from_config(config.vlm)
    cache = out_dir / "cache"
    base_kinds = (*ORIGINAL_KINDS, "caption")
    base = ConversationData.prepare(
        model, synthetic_conversations(settings.base_scenes, kinds=base_kinds), cache, progress=progress
    )
    # Counting-only scenes, then the same number with any kind: the new skill plus a replay of the old.
    half = settings.lora_scenes // 2
    lora_set = synthetic_conversations(half, start=10**6, kinds=(NEW_KIND,))
    lora_set += synthetic_conversations(half, start=10**6 + half, kinds=(*base_kinds, NEW_KIND))
    lora = ConversationData.prepare(model, lora_set, cache, progress=progress)
    held_out = ConversationData.prepare(
        model, every_question(settings.held_out_scenes), cache, progress=progress
    )
    seconds["encoding"] = time.perf_counter() - start

    tick = time.perf_counter()
    standardise_projector_input(model, base.features[list(range(min(512, len(base.features))))])
    config.train.stage, config.train.steps, config.train.lr = 0, settings.base_steps, settings.base_lr
    before = fit_vlm(model, base, held_out, config.train, out_dir / "stage0", progress=progress).metrics
    seconds["stage 0"] = time.perf_counter() - tick

    tick = time.perf_counter()
    model.add_lora()
    frozen = frozen_state(model)
    config.train.stage, config.train.steps, config.train.lr = 2, settings.lora_steps, settings.lora_lr
    after = fit_vlm(model, lora, held_out, config.train, out_dir / "stage2", progress=progress).metrics
    unchanged = frozen_state(model)
    same = frozen.keys() == unchanged.keys() and all(np.array_equal(frozen[k], unchanged[k]) for k in frozen)
    seconds["LoRA"] = time.perf_counter() - tick

    model.save_pretrained(out_dir / "vlm")
    seconds["all"] = time.perf_counter() - start
    return VLMDemoResult(before, after, same, seconds, out_dir)
