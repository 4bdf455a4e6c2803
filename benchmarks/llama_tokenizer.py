"""Train a small Llama-style tokenizer offline: BPE with byte fallback and "▁" for spaces.

llama.cpp's convert_hf_to_gguf.py reads such a tokenizer.json as a Llama
vocabulary (gguf-py's ``LlamaHfVocab``), while a byte-level BPE would need a
pre-tokenizer hash listed in the converter's table. The synthetic base models use the
same tokenizer, so that mergekit-moe and the hidden gate modes can load one.
"""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
# Byte-fallback tokens, as in Llama's vocabulary: every byte has a token.
BYTE_TOKENS = tuple(f"<0x{value:02X}>" for value in range(256))
TRAINING_TEXT = (
    "the quick brown fox jumps over the lazy dog",
    "solve the equation x plus two equals five",
    "def add(a, b): return a + b",
    "hello, how are you today? I am fine, thank you",
    "integrals derivatives algebra geometry numbers",
    "python code function class variable loop",
)
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(BYTE_TOKENS) + 1


def write_llama_tokenizer(folder: Path, vocab_size: int) -> PreTrainedTokenizerFast:
    """Train the tokenizer, save tokenizer.json and its configs into ``folder``, and return it.

    The vocabulary has at most ``vocab_size`` entries, fewer if the training
    text has fewer merges. Token ids: 0 ``<unk>``, 1 ``<s>``, 2 ``</s>``.

    Raises:
        ValueError: ``vocab_size`` leaves no room for the special and byte tokens.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size {vocab_size} is too small; the special and byte tokens alone need {MIN_VOCAB_SIZE}")

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL_TOKENS, *BYTE_TOKENS],
        initial_alphabet=["▁"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer=trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", add_bos_token=True
    )
    fast.save_pretrained(folder)
    return fast
