"""The toy tokenizer: byte-level BPE trained on the shapes world's text, with Qwen2.5's ChatML template."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

from vlkit.data import toy

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>")
DEFAULT_SYSTEM = "You are a helpful assistant."

# Qwen2.5's ChatML template (without tools). Content may be a string or a list of {"type": "text"|"image"} parts;
# image parts render as the <image> placeholder. Assistant content is wrapped in {% generation %} so that
# apply_chat_template(..., return_assistant_tokens_mask=True) marks the supervised tokens.
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part.type == 'image' -%}{{- '<image>' -}}{%- elif part.type == 'text' -%}{{- part.text -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if messages[0].role == 'system' -%}"
    "{{- '<|im_start|>system\\n' + render(messages[0].content) + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if not (loop.first and message.role == 'system') -%}"
    "{%- if message.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{% generation %}{{- render(message.content) + '<|im_end|>' -}}{% endgeneration %}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + render(message.content) + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _corpus(data_dir: Path) -> Iterator[str]:
    for kind in ("align", "instruct"):
        for rec in json.loads((data_dir / f"{kind}_train.json").read_text()):
            for turn in rec["conversations"]:
                yield turn["value"].replace("<image>\n", "")
    for _ in range(100):  # the chat template's fixed text, so that its words become single tokens
        yield f"system\n{DEFAULT_SYSTEM}\nuser\nScene: \nassistant\n"
    for shape in toy.SHAPES:
        yield f"{toy.plural(shape)} and {shape}"
    yield " ".join(str(i) for i in range(10))


def build_tokenizer(data_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None):
    """Byte-level BPE trained on the toy corpus, wrapped as a ``PreTrainedTokenizerFast`` with ChatML."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(_corpus(Path(data_dir)), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>", "<image>"], model_max_length=2048,
        clean_up_tokenization_spaces=False, padding_side="right",
    )
    tok.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        tok.save_pretrained(out_dir)
    return tok
