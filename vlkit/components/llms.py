"""Language models: any HF causal LM by hub name or local dir, with its tokenizer and chat template."""
from __future__ import annotations

import torch
from torch import nn

from vlkit.registry import register_llm

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFCausalLM(nn.Module):
    """A transformers causal LM plus its tokenizer and the image placeholder token.

    ``hidden_states`` runs the decoder only; ``logits`` applies the LM head, so callers can apply the head to the
    supervised positions alone (the LM head over a large vocabulary is a big part of a small LLM's step).
    """

    def __init__(self, model: nn.Module, tokenizer, image_token: str = "<image>") -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.image_token = image_token
        if image_token not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id >= model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                f"the tokenizer of {getattr(model, 'name_or_path', '?')} has no chat template; vlkit formats every "
                "prompt through the chat template (use an -Instruct/-Chat model or set one on the tokenizer)"
            )

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    def base(self) -> nn.Module:
        """The transformers model under any peft wrapper."""
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        # [B, T] -> [B, T, H]
        return self.model.get_input_embeddings()(input_ids)

    def hidden_states(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                      position_ids: torch.Tensor | None = None) -> torch.Tensor:
        # [B, T, H] -> [B, T, H] (decoder only, no LM head)
        decoder = self.base().get_decoder()
        out = decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False)
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # [..., H] -> [..., V]
        return self.base().get_output_embeddings()(hidden)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # [B, T, H] -> [B, T, V]
        return self.logits(self.hidden_states(inputs_embeds, attention_mask))


@register_llm("hf")
def hf(model: str = "Qwen/Qwen2.5-1.5B-Instruct", tokenizer: str | None = None, dtype: str = "float32",
       trust_remote_code: bool = False, attn_implementation: str | None = "sdpa", image_token: str = "<image>",
       revision: str | None = None, random_init: bool = False) -> HFCausalLM:
    """Any ``AutoModelForCausalLM`` by hub name or local dir; ``trust_remote_code`` only when the recipe asks.

    ``random_init=True`` builds the model from ``model``'s published config with random weights (no weights read,
    only when asked; vlkit/random_init.py). The embedding keeps the config's vocabulary size; ``tokenizer`` (e.g.
    ``toy:tokenizer``, a ChatML tokenizer that ships with vlkit) must not have more tokens than that."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"llm.dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    kwargs = {"trust_remote_code": trust_remote_code, "dtype": DTYPES[dtype]}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if random_init:
        from vlkit.random_init import fixed_seed, mark_random, published_config

        with fixed_seed():
            lm = AutoModelForCausalLM.from_config(published_config(model), **kwargs)
    else:
        lm = AutoModelForCausalLM.from_pretrained(model, revision=revision, **kwargs)
    lm.requires_grad_(False)  # frozen until a training stage says otherwise (LoRA or full)
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer or model, trust_remote_code=trust_remote_code, revision=revision)
    except OSError as exc:
        if not random_init or tokenizer:
            raise
        raise OSError(f"llm.random_init builds {model} from its config, but its tokenizer is not available offline "
                      f"({exc}); set llm.tokenizer (toy:tokenizer is a ChatML tokenizer that ships with vlkit)") from exc
    if random_init:
        vocab = lm.get_input_embeddings().num_embeddings
        if len(tok) > vocab:
            raise ValueError(f"llm.tokenizer has {len(tok)} tokens, more than {model}'s embedding ({vocab}); "
                             "random_init keeps the published vocabulary size")
    out = HFCausalLM(lm, tok, image_token=image_token)
    return mark_random(out) if random_init else out
