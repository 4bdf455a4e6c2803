"""Every buffer of the merge whose size can grow, with its bound in one place.

Nothing else allocates memory that scales with the model: tensors are never
loaded whole, only chunks of them.
"""

from dataclasses import dataclass

DEFAULT_CHUNK_SIZE = 16 * 1024**2  # bytes read from a source per step
MIN_CHUNK_SIZE = 64 * 1024  # bytes
DEFAULT_SHARD_SIZE = 5 * 1000**3  # bytes per output file, as mergekit-moe and transformers default to 5 GB

# Estimated memory that loading the tokenizer and torch's first kernels add
# to the imported libraries. About 60 MB was measured with a small BPE
# tokenizer; tokenizers with larger vocabularies take more.
LIBRARY_WARMUP_BYTES = 64 * 1024**2

# Bytes of a linear layer's weight that the hidden gate pass holds at once:
# the read buffer in the checkpoint's dtype and the block converted to the
# compute dtype each stay within this.
WEIGHT_BLOCK_BYTES = 16 * 1024**2

# Hidden states of one batch of equal-length prompts in the gate pass. The
# layer's activations for a batch were measured at up to about 17 times its
# states (a tiny Llama, transformers 5.25, 10,000 prompts), so batches stay
# small; larger ones gained little speed.
STATE_BATCH_BYTES = 1024**2
ACTIVATION_FACTOR = 20

# Noise is drawn in fixed blocks of this many float32 elements, each block
# from its own seed, so that the noise does not depend on the chunk size.
NOISE_BLOCK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class MemoryBudget:
    """Upper bounds, in bytes, of the buffers that the merge allocates."""

    chunk_size: int
    router_bytes: int  # (layers, experts, hidden) float32 router weights
    gate_pass_bytes: int  # working memory of the gate pass

    @property
    def copy_phase_bytes(self) -> int:
        # A chunk of n bytes of a 16-bit source becomes a float32 copy of 2n
        # bytes when a transform applies, then an output copy of at most n
        # bytes, so the read buffer and both copies add up to 4n. A noise
        # block adds 4 bytes per element.
        return 4 * self.chunk_size + 4 * NOISE_BLOCK_ELEMENTS

    @property
    def total_bytes(self) -> int:
        return self.router_bytes + max(self.copy_phase_bytes, self.gate_pass_bytes)


def router_bytes(num_layers: int, num_experts: int, hidden_size: int) -> int:
    """Return the size of the float32 router weights of all layers."""
    return 4 * num_layers * num_experts * hidden_size


def hidden_pass_bytes(layer_parameters: int, compute_item_size: int, hidden_size: int, max_prompt_tokens: int) -> int:
    """Return the working memory of the hidden gate pass.

    One decoder layer's weights in the compute dtype, plus one batch of
    prompt states and the layer's activations for it, ACTIVATION_FACTOR
    times the states. A single prompt longer than a batch counts alone.
    """
    batch_bytes = max(STATE_BATCH_BYTES, 4 * hidden_size * max_prompt_tokens)
    return layer_parameters * compute_item_size + ACTIVATION_FACTOR * batch_bytes


def cheap_embed_bytes(num_experts: int, hidden_size: int, chunk_size: int) -> int:
    """Return the working memory of the cheap_embed gate pass.

    Embedding rows are read one at a time into float32 sums, one per expert
    and prompt set, so prompts of any number and length fit.
    """
    return 2 * 4 * num_experts * hidden_size + min(chunk_size, 4 * hidden_size * 2)
