"""VisionLLM: splicing, several images and mixed batches, errors, LoRA save/load, and the LLaVA export.

Everything runs on a tiny random DINOv2 (and DINOv3) and a tiny Llama built from configs with the project's
word-level tokenizer; nothing is downloaded. The export test loads the exported directory in a separate
Python process that never imports dinobridge.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from bridge.config import ConfigError, EncoderConfig, LLMConfig, ProjectorConfig, VisionLLMConfig
from bridge.images import ImageLoadError
from bridge.llava_export import export_llava
from bridge.model import read_safetensors
from bridge.synthetic import SyntheticWorld
from bridge.vlm import IGNORE, VisionLLM
from tests.conftest import TINY_DINOV2

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}


# DINOv3 as the facebook/dinov3-* checkpoints are built (4 registers, RoPE), but with 14-pixel patches so
# that the 56-pixel scenes are taken at the encoder's own size (the export's logits match exactly there).
TINY_DINOV3 = TINY_DINOV2 | {"model_type": "dinov3_vit", "num_register_tokens": 4}


def tiny_vlm_config(
    registers: int = 0, projector: str = "mlp", encoder: dict | None = None, **projector_options
) -> VisionLLMConfig:
    architecture = dict(encoder or TINY_DINOV2)
    if registers:
        architecture |= {"model_type": "dinov2_with_registers", "num_register_tokens": registers}
    return VisionLLMConfig(
        encoder=EncoderConfig(architecture=architecture, layer=-1),
        projector=ProjectorConfig(kind=projector, options=projector_options),
        llm=LLMConfig(architecture=dict(TINY_LLAMA)),
    )


def tiny_vlm(
    registers: int = 0, lora: bool = False, projector: str = "mlp", encoder: dict | None = None
) -> VisionLLM:
    """A tiny VisionLLM whose projector (and LoRA, if any) are random, not zero, so they matter."""
    model = VisionLLM.from_config(tiny_vlm_config(registers, projector, encoder))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.projector.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
        if lora:
            model.add_lora()
            for name, parameter in model.llm.named_parameters():
                if "lora_B" in name:  # peft starts B at zero; a zero adapter would prove nothing
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return tiny_vlm()


@pytest.fixture(scope="module")
def scenes():
    return [scene.render() for scene in SyntheticWorld(0, image_size=56).scenes(0, 3)]


def logits_of(model: VisionLLM, prompts, images) -> torch.Tensor:
    batch = model.batch(prompts, images, padding_side="left")
    with torch.no_grad():
        return model(batch["input_ids"], batch["attention_mask"], batch["visual_tokens"]).logits, batch


def test_placeholder_is_one_token_and_expands_to_the_visual_tokens(model, scenes):
    assert model.tokenizer.tokenize(model.image_token) == [model.image_token]
    assert model.tokens_per_image() == 16  # 56 px / 14 = 4x4 patches; "default" drops the CLS token
    _, batch = logits_of(model, ["<image> what colour is the star ?"], [[scenes[0]]])
    ids = batch["input_ids"][0]
    assert (ids == model.image_token_id).sum() == 16
    embeddings = model.embed(batch["input_ids"], batch["visual_tokens"])
    assert torch.equal(embeddings[0, :16], batch["visual_tokens"][0])
    text = model.llm.get_input_embeddings()(ids[16:])
    assert torch.equal(embeddings[0, 16:], text)


def test_registers_stay_in_the_default_strategy_and_cls_only_in_full():
    with_registers = tiny_vlm(registers=4)
    assert with_registers.tokens_per_image() == 4 + 16
    assert tiny_vlm(encoder=TINY_DINOV3).tokens_per_image() == 4 + 16  # DINOv3 carries 4 registers
    config = tiny_vlm_config(registers=4)
    config.select_strategy = "full"
    assert VisionLLM.from_config(config).tokens_per_image() == 1 + 4 + 16


def test_several_images_per_prompt_and_mixed_batches_match_single_prompts(model, scenes):
    prompts = [
        model.chat_prompt("what shape is the red object ?", images=2),
        model.chat_prompt("describe the image .", images=0),
        model.chat_prompt("where is the star ?", images=1),
    ]
    images = [[scenes[0], scenes[1]], [], [scenes[2]]]
    batched, batch = logits_of(model, prompts, images)
    for row, (prompt, group) in enumerate(zip(prompts, images, strict=True)):
        alone, single = logits_of(model, [prompt], [group])
        length = single["input_ids"].shape[1]
        assert torch.allclose(batched[row, -length:], alone[0], atol=1e-5), (
            f"prompt {row} differs when batched"
        )
    # The two images of prompt 0 are spliced in order: swapping them changes the logits.
    swapped, _ = logits_of(model, [prompts[0]], [[scenes[1], scenes[0]]])
    assert not torch.allclose(swapped[0], batched[0, -swapped.shape[1] :], atol=1e-4)


def test_chat_prompt_is_the_tokenizers_chat_template(model):
    prompt = model.chat_prompt("what colour is the star ?", images=1)
    expected = model.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\nwhat colour is the star ?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt == expected and prompt.startswith("<|user|> <image>") and prompt.endswith("<|assistant|> ")


def test_batched_generation_equals_one_prompt_at_a_time(model, scenes):
    prompts = [
        model.chat_prompt("what colour is the star ?", 1),
        model.chat_prompt("how many objects are there ?", 2),
    ]
    images = [[scenes[0]], [scenes[1], scenes[2]]]
    # The untrained LLM's favourite tokens are special ones, which decoding drops: keep to words.
    options = {"max_new_tokens": 6, "suppress_tokens": list(model.tokenizer.get_added_vocab().values())}
    together = model.generate(prompts, images, **options)
    apart = [model.generate(p, g, **options) for p, g in zip(prompts, images, strict=True)]
    assert together == apart
    assert all(len(reply.split()) == 6 for reply in together)


@pytest.mark.parametrize("placeholders, images", [(1, 2), (2, 1), (0, 1), (1, 0)])
def test_images_and_placeholders_must_pair_up(model, scenes, placeholders, images):
    prompt = "<image> " * placeholders + "what colour is the star ?"
    with pytest.raises(ValueError, match=f"has {placeholders} <image> placeholder.*{images} image"):
        model.generate(prompt, scenes[:images])


def test_projector_width_must_match_the_llms_hidden_size():
    config = tiny_vlm_config()
    config.projector.out_dim = 64
    with pytest.raises(ConfigError, match="projector outputs 64-d tokens but the LLM .* hidden size 48"):
        VisionLLM.from_config(config)


def test_text_route_projectors_are_refused():
    with pytest.raises(ConfigError, match="use 'mlp'.*'patch-merge'"):
        VisionLLM.from_config(tiny_vlm_config(projector="attention"))


def test_an_image_the_loader_rejects_names_the_file(model, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a picture")
    with pytest.raises(ImageLoadError, match="notes.jpg"):
        model.chat("what colour is the star ?", [str(bad)])


def test_patch_merge_cuts_tokens_4x_and_refuses_export(tmp_path, scenes):
    merged = tiny_vlm(projector="patch-merge")
    assert merged.tokens_per_image() == 4  # 4x4 patches -> 2x2
    prompt = merged.chat_prompt("what colour is the star ?", 1)
    logits, batch = logits_of(merged, [prompt, prompt], [[scenes[0]], [scenes[1]]])
    assert (batch["input_ids"] == merged.image_token_id).sum(1).tolist() == [4, 4]
    assert not torch.allclose(logits[0], logits[1], atol=1e-4)  # the merged tokens carry the image
    # The untrained LLM favours special tokens, which decoding drops: keep to words to count them.
    words = {"suppress_tokens": list(merged.tokenizer.get_added_vocab().values())}
    assert len(merged.generate(prompt, [scenes[0]], max_new_tokens=3, **words).split()) == 3
    with pytest.raises(ConfigError, match="'patch-merge' projector cannot be exported.*choose|kind 'mlp'"):
        export_llava(merged, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_lora_lands_only_in_the_llm_and_round_trips_in_peft_format(tmp_path, scenes):
    model = tiny_vlm(lora=True)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name or name.startswith("projector.") for name in trainable)
    assert not any("lora" in name for name, _ in model.encoder.named_parameters())
    model.save_pretrained(tmp_path / "vlm")
    adapter = tmp_path / "vlm" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    base_weights = read_safetensors(tmp_path / "vlm" / "llm" / "model.safetensors")
    assert base_weights and not any("lora" in name for name in base_weights)  # the frozen base, no adapter
    reloaded = VisionLLM.from_pretrained(tmp_path / "vlm").eval()
    prompt = [model.chat_prompt("where is the star ?", 1)]
    before, _ = logits_of(model, prompt, [[scenes[0]]])
    after, _ = logits_of(reloaded, prompt, [[scenes[0]]])
    assert torch.equal(before, after)


EXPORT_CASES = {  # name: (registers, LoRA, encoder architecture)
    "dinov2": (0, False, TINY_DINOV2),
    "dinov2+lora": (0, True, TINY_DINOV2),
    "registers": (4, False, TINY_DINOV2),
    "registers+lora": (4, True, TINY_DINOV2),
    "dinov3+lora": (0, True, TINY_DINOV3),
}


def test_export_gives_the_same_logits_in_plain_transformers(tmp_path, scenes):
    """Each case: VisionLLM logits saved, then a fresh process with no dinobridge import compares."""
    image_path = tmp_path / "scene.png"
    scenes[0].save(image_path)
    cases = {}
    for name, (registers, lora, encoder) in EXPORT_CASES.items():
        model = tiny_vlm(registers=registers, lora=lora, encoder=encoder)
        prompt = model.chat_prompt("what colour is the star ?", 1)
        logits, _ = logits_of(model, [prompt], [[scenes[0]]])
        export_llava(model, tmp_path / name)
        torch.save(logits, tmp_path / f"{name}.pt")
        cases[name] = prompt
    script = textwrap.dedent(
        f"""
        import json, sys, torch, transformers
        from PIL import Image
        results = {{}}
        for name, prompt in {cases!r}.items():
            model = transformers.LlavaForConditionalGeneration.from_pretrained({str(tmp_path)!r} + "/" + name)
            processor = transformers.AutoProcessor.from_pretrained({str(tmp_path)!r} + "/" + name)
            inputs = processor(images=Image.open({str(image_path)!r}), text=prompt, return_tensors="pt")
            with torch.no_grad():
                logits = model.eval()(**inputs).logits
            expected = torch.load({str(tmp_path)!r} + "/" + name + ".pt")
            results[name] = (logits - expected).abs().max().item() if logits.shape == expected.shape else None
        results["imported bridge"] = any(m == "bridge" or m.startswith("bridge.") for m in sys.modules)
        print(json.dumps(results))
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert results.pop("imported bridge") is False
    for name, difference in results.items():
        assert difference is not None and difference < 1e-4, f"{name}: max abs logit difference {difference}"


def test_from_config_leaves_the_callers_config_as_it_was():
    config = tiny_vlm_config()
    before = copy.deepcopy(config)
    model = VisionLLM.from_config(config)
    assert config == before and config.projector.in_dim is None
    assert model.config.projector.in_dim == TINY_DINOV2["hidden_size"]
    assert model.config.projector.out_dim == TINY_LLAMA["hidden_size"]


@pytest.mark.parametrize("lora", [False, True])
def test_answer_loss_is_the_full_logits_loss_and_gradient(scenes, lora):
    """Logits only where a label is predicted: the same loss and the same gradients as transformers'
    loss over the full (B, L, vocab) logits, for a right-padded batch with labels in different places."""
    model = tiny_vlm(lora=lora).train()
    prompts = [model.chat_prompt("where is the star ?", 1), model.chat_prompt("a long caption of it", 1)]
    images = [[scenes[0]], [scenes[1]]]
    ids = model.batch(prompts, images, padding_side="right")["input_ids"]
    labels = torch.full_like(ids, IGNORE)
    labels[0, -4:-1], labels[1, 7:12] = ids[0, -4:-1], ids[1, 7:12]

    def inputs():  # the visual tokens anew each time: the projector's graph is used up by a backward pass
        batch = model.batch(prompts, images, padding_side="right")
        return batch["input_ids"], batch["attention_mask"], batch["visual_tokens"], labels

    trained = [p for p in model.parameters() if p.requires_grad]
    full = model(*inputs()).loss
    full_gradients = torch.autograd.grad(full, trained)
    kept = model.answer_loss(*inputs())
    kept_gradients = torch.autograd.grad(kept, trained)
    assert torch.allclose(kept, full, atol=1e-6) and full.item() > 0
    for mine, theirs in zip(kept_gradients, full_gradients, strict=True):
        assert torch.allclose(mine, theirs, atol=1e-6)


def test_answer_loss_without_logits_to_keep_takes_the_full_logits(scenes, monkeypatch):
    """An LLM whose forward has no `logits_to_keep` (older architectures) gets transformers' own loss."""
    model = tiny_vlm().train()
    batch = model.batch([model.chat_prompt("where ?", 1)], [[scenes[0]]], padding_side="right")
    labels = batch["input_ids"].clone()
    inputs = (batch["input_ids"], batch["attention_mask"], batch["visual_tokens"], labels)
    expected = model(*inputs).loss
    plain_forward = model.llm.forward
    monkeypatch.setattr(
        model.llm,
        "forward",
        lambda inputs_embeds, attention_mask, position_ids, labels=None: plain_forward(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
        ),
    )
    assert torch.allclose(model.answer_loss(*inputs), expected)
