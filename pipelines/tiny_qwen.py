"""A tiny random-weight Qwen 2.5 look-alike, built locally (no hub) for tests and the demo.

The folder it writes loads with `AutoTokenizer` / `AutoModelForCausalLM` exactly like a real
Qwen 2.5 checkpoint: a Qwen2 architecture, a byte-level BPE tokenizer carrying Qwen's special
tokens and Qwen 2.5's ChatML chat template, and a generation config that stops on
`<|im_end|>` / `<|endoftext|>` as the instruct model's does.
"""
from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Qwen 2.5's template without the tool-calling branches: a system turn first (Qwen's default
# system text when the conversation has none), then ChatML turns, then the assistant header.
QWEN25_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] != 'system' or not loop.first %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_CORPUS = (
    "Write a short story about a detective in Los Angeles during the nineteen forties.",
    "A cinematic photo of a red fox in a snowy forest, golden hour, highly detailed.",
    "You are a helpful assistant. Answer the question clearly and briefly.",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?.,;:'\"()[]{}<>-_/\\@#$%^&*+=",
    "Noir detective, rain on neon streets, a mystery, a client, a secret, a city at night.",
    "Enhance this prompt: portrait of a woman, soft light, film grain, 35mm, bokeh.",
)


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(_CORPUS * 4, trainer=trainer)
    trained = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    # Qwen's own tokenizer class rebuilds Qwen's pre-tokenizer and decoder around our vocab.
    tokenizer = Qwen2TokenizerFast(vocab=trained["vocab"], merges=merges, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None,
                                   additional_special_tokens=list(SPECIAL_TOKENS[1:]))
    tokenizer.chat_template = QWEN25_CHAT_TEMPLATE
    tokenizer.model_max_length = 32768
    return tokenizer


def build_tiny_qwen(out_dir: str | Path, seed: int = 0, *, max_position_embeddings: int = 512) -> Path:
    """Write a tiny Qwen2ForCausalLM + tokenizer into `out_dir`; base and instruct differ by seed."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(vocab_size=320)
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    endoftext, im_end = ids[0], ids[2]
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True, bos_token_id=endoftext, eos_token_id=im_end, pad_token_id=endoftext,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=[im_end, endoftext], pad_token_id=endoftext, bos_token_id=endoftext,
        do_sample=True, temperature=0.7, top_p=0.8,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
