"""Export a VisionLLM as a native transformers LLaVA checkpoint: `dinobridge export-llava DIR OUT`.

The contract: `LlavaForConditionalGeneration.from_pretrained(OUT)` and `AutoProcessor.from_pretrained(OUT)`
load it with no dinobridge installed, LoRA merged into the LLM, and give the VisionLLM's logits for the
same image and prompt. That holds because the VisionLLM selects visual tokens only in ways LLaVA can
express: `hidden_states[vision_feature_layer]` (before DINOv2's final layer norm), then strategy
"default" (drop exactly the first token, so register tokens stay) or "full", then the two-layer GELU
MLP (linear_1 -> gelu -> linear_2, LLaVA's multi_modal_projector). Anything else is refused with the
reason and the choice that exports.

Not here: the model itself (vlm.py).
"""

from __future__ import annotations

from pathlib import Path

import transformers

from bridge.config import ConfigError
from bridge.vlm import VisionLLM


def check_exportable(model: VisionLLM) -> None:
    """Raise ConfigError naming why the model cannot become a LLaVA checkpoint and what to choose."""
    config = model.config
    kind = config.projector.kind
    if kind == "patch-merge":
        raise ConfigError(
            "the 'patch-merge' projector cannot be exported to transformers LLaVA: LLaVA feeds every "
            "vision token through its projector on its own and has no step that merges 2x2 patches, so "
            "its visual tokens would differ. Train with projector kind 'mlp' (LLaVA's mlp2x_gelu) to "
            "export, or keep using this model through dinobridge (VisionLLM, dinobridge chat)"
        )
    if kind != "mlp":
        raise ConfigError(f"projector '{kind}' has no LLaVA equivalent; train with projector kind 'mlp'")
    hidden = model.llm.config.get_text_config().hidden_size
    width = config.projector.options.get("hidden_dim") or hidden
    if width != hidden:
        raise ConfigError(
            f"LLaVA's projector is {hidden}-wide inside (the LLM's hidden size) but this one is {width}; "
            "train with projector.options.hidden_dim unset to export"
        )
    if config.encoder.layer is None:
        raise ConfigError(
            "encoder.layer is null (tokens after DINOv2's final layer norm), which LLaVA's "
            "vision_feature_layer cannot select (its hidden_states come before that norm); train with "
            "encoder.layer -1 (the same block, before the norm) to export"
        )


def export_llava(model: VisionLLM, out_dir: str | Path) -> Path:
    """Write `model` to out_dir as LlavaForConditionalGeneration + LlavaProcessor (float32)."""
    check_exportable(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder, config = model.encoder, model.config
    llm = model.merged_llm()
    llava_config = transformers.LlavaConfig(
        vision_config=encoder.model.config.to_dict(),
        text_config=llm.config.to_dict(),
        image_token_index=model.image_token_id,
        image_seq_length=model.tokens_per_image(),
        vision_feature_layer=config.encoder.layer,
        vision_feature_select_strategy=config.select_strategy,
        projector_hidden_act="gelu",  # nn.GELU(): the exact erf form, as ACT2FN["gelu"]
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(llm.config.tie_word_embeddings),
    )
    llava = transformers.LlavaForConditionalGeneration(llava_config).eval()
    mlp = model.projector.mlp
    weights = {f"model.vision_tower.{k}": v for k, v in encoder.model.state_dict().items()}
    weights |= {f"model.language_model.{k}": v for k, v in llm.get_decoder().state_dict().items()}
    weights |= {
        "model.multi_modal_projector.linear_1.weight": mlp[0].weight,
        "model.multi_modal_projector.linear_1.bias": mlp[0].bias,
        "model.multi_modal_projector.linear_2.weight": mlp[2].weight,
        "model.multi_modal_projector.linear_2.bias": mlp[2].bias,
        "lm_head.weight": llm.get_output_embeddings().weight,
    }
    missing, unexpected = llava.load_state_dict(
        {k: v.detach().float() for k, v in weights.items()}, strict=False
    )
    if missing or unexpected:
        raise RuntimeError(
            f"LLaVA export left weights unset {missing} or unused {unexpected}; please report this"
        )
    llava.save_pretrained(out_dir)
    processor = transformers.LlavaProcessor(
        image_processor=transformers.BitImageProcessor(
            **_without_type(encoder.preprocessing.processor_config())
        ),
        tokenizer=model.tokenizer,
        patch_size=encoder.patch_size,
        vision_feature_select_strategy=config.select_strategy,
        chat_template=model.tokenizer.chat_template,
        image_token=model.image_token,
        num_additional_image_tokens=1 + encoder.num_registers,  # CLS and registers; "default" drops one
    )
    processor.save_pretrained(out_dir)
    return out_dir


def _without_type(processor_config: dict) -> dict:
    return {k: v for k, v in processor_config.items() if k != "image_processor_type"}
