"""Tiny random Hugging Face models and a word-level tokenizer, saved with `save_pretrained` for the tests
(nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path
from typing import List

WORDS: List[str] = ("the a cat dog bird sat ran flew on under over mat log tree and then it was good bad "
                    "very not happy sad day night big small red blue").split()
SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]


def save_tokenizer(directory: Path) -> None:
    """A whitespace word-level tokenizer over :data:`WORDS`, with pad/unk/bos/eos tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]",
                                        bos_token="[BOS]", eos_token="[EOS]")
    tokenizer.save_pretrained(str(directory))


def save_model(directory: Path, task: str = "causal_lm", arch: str = "llama", num_labels: int = 2,
               seed: int = 0) -> Path:
    """A two-layer random model of ``arch`` (llama or gpt2) for ``task`` (causal_lm or
    sequence_classification) and its tokenizer, in ``directory``."""
    import torch
    import transformers

    torch.manual_seed(seed)
    vocab = len(SPECIAL) + len(WORDS)
    if arch == "llama":
        config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=128, pad_token_id=0, bos_token_id=2,
                                          eos_token_id=3, num_labels=num_labels)
        cls = (transformers.LlamaForCausalLM if task == "causal_lm"
               else transformers.LlamaForSequenceClassification)
    else:
        config = transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                         pad_token_id=0, bos_token_id=2, eos_token_id=3, num_labels=num_labels)
        cls = transformers.GPT2LMHeadModel if task == "causal_lm" else transformers.GPT2ForSequenceClassification
    model = cls(config)
    model.save_pretrained(str(directory))
    save_tokenizer(directory)
    return directory
