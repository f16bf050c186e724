"""The offline default LLM: a tiny decoder built from a config and a word-level tokenizer of the
synthetic world, with a chat template.

No model hub is reachable where the project is built and tested, so the LLM route's demo, notebook and
tests need an LLM that exists without a download. The tokenizer knows every word the synthetic world
says (captions, questions, answers) plus the chat and image tokens; it is made here, deterministically,
and saved with the model in transformers' own format, so `AutoTokenizer` and `LlavaProcessor` load it.

Not here: real LLMs (bridge/vlm.py loads any transformers causal LM by name) or training (training/).
"""

from __future__ import annotations

import functools

import torch
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from bridge.config import ConfigError, LLMConfig
from bridge.synthetic import SyntheticWorld

PAD, UNKNOWN, END = "<pad>", "<unk>", "<|end|>"
ROLES = ("<|system|>", "<|user|>", "<|assistant|>")
CAPTION_PROMPT = "Describe the image."

# Roles as tokens, one turn a line; content may be a string or a list of {"type": "image"|"text"} parts,
# the form transformers' processors pass to apply_chat_template.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|> ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image> ' }}{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ ' <|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


@functools.cache
def synthetic_vocabulary(scenes: int = 200) -> tuple[str, ...]:
    """Every lower-cased word and punctuation mark the synthetic world uses, sorted. 200 scenes use
    every template, colour, shape, size and place (2,000 give the same list)."""
    split = pre_tokenizers.Whitespace()
    texts = [CAPTION_PROMPT]
    for scene in SyntheticWorld(0).scenes(0, scenes):
        texts += scene.captions(4)
        texts += [text for question, answer, _ in scene.questions() for text in (question, answer)]
    return tuple(sorted({word for text in texts for word, _ in split.pre_tokenize_str(text.lower())}))


def build_tokenizer(image_token: str = "<image>") -> transformers.PreTrainedTokenizerFast:
    """The word-level tokenizer: unknown words become <unk>; special tokens are never split."""
    specials = [PAD, UNKNOWN, END, *ROLES, image_token]
    vocabulary = {token: index for index, token in enumerate([*specials, *synthetic_vocabulary()])}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token=UNKNOWN))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(specials)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        unk_token=UNKNOWN,
        eos_token=END,
        extra_special_tokens={"image_token": image_token},
        chat_template=CHAT_TEMPLATE,
    )


def build_offline_llm(
    config: LLMConfig, dtype: torch.dtype = torch.float32
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerFast]:
    """A random decoder of `config.architecture` (seeded), built in `dtype`, and the synthetic-world
    tokenizer."""
    tokenizer = build_tokenizer(config.image_token)
    architecture = dict(config.architecture)
    model_type = architecture.pop("model_type", "llama")
    try:
        # An architecture may ask for a larger vocabulary (a real LLM's shape, for benchmarks), never smaller.
        vocabulary = max(len(tokenizer), architecture.pop("vocab_size", 0))
        model_config = transformers.AutoConfig.for_model(
            model_type,
            vocab_size=vocabulary,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
            **architecture,
        )
    except (ValueError, TypeError) as error:
        raise ConfigError(
            f"llm.architecture {config.architecture} is not a transformers config: {error}"
        ) from None
    torch.manual_seed(config.seed)
    # Built in `dtype` from the start: a bf16 model never holds its float32 weights at once.
    llm = transformers.AutoModelForCausalLM.from_config(model_config, dtype=dtype, trust_remote_code=False)
    return llm, tokenizer
