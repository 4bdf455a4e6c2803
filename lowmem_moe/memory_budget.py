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

# Estimated memory that importing transformers' model code for the base's
# model_type adds when the hidden gate pass starts. About 90 MiB was measured
# for llama with transformers 5.25 in a process that had imported the merge.
MODEL_CODE_BYTES = 128 * 1024**2

# Bytes of a linear layer's weight that the hidden gate pass holds at once:
# the read buffer in the checkpoint's dtype and the block converted to the
# compute dtype each stay within this.
WEIGHT_BLOCK_BYTES = 16 * 1024**2

# The hidden gate pass runs several prompts as one packed sequence per
# forward call, because every call reads the layer's linear weights again.
# Packs are bounded by the estimate of their activations below, and by a
# token count. At 512 tokens the matrix products, which use each weight once
# per token, already outweigh reading it. Beyond that, the attention scores,
# most of which the mask discards across prompts, grow with the square of a
# pack.
PACK_ACTIVATION_BYTES = 128 * 1024**2
PACK_MAX_TOKENS = 512

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
        # The gate pass runs while the copy does (see merge.py), so their
        # buffers add up.
        return self.router_bytes + self.copy_phase_bytes + self.gate_pass_bytes


def router_bytes(num_layers: int, num_experts: int, hidden_size: int) -> int:
    """Return the size of the float32 router weights of all layers."""
    return 4 * num_layers * num_experts * hidden_size


@dataclass(frozen=True)
class LayerShape:
    """The sizes of a decoder layer that its activations grow with."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    head_dim: int


def pack_activation_bytes(shape: LayerShape, tokens: int) -> int:
    """Return an estimate of the activations of one decoder layer's forward call on ``tokens`` tokens.

    Every term counts 4-byte elements: float32, or bfloat16 activations with
    their float32 softmax. On a Yi-34B-shaped Llama layer (torch 2.13,
    transformers 5.25, x86-64 Linux), a forward call raised the peak RSS by
    103 MiB at 197 tokens and by 521 MiB at 800 tokens. This estimate plus
    two weight blocks gives 160 and 758 MiB.
    """
    # Eager attention makes the (heads, tokens, tokens) scores, then scales,
    # masks and softmaxes them, each step into a new tensor while the
    # previous one still exists. The additive mask is (tokens, tokens).
    scores = 2 * shape.num_attention_heads * tokens**2 + tokens**2
    # The MLP keeps act(gate), up and their product, each (tokens, intermediate).
    mlp = 3 * tokens * shape.intermediate_size
    # The (tokens, width) tensors: the packed input and output, the norms,
    # query, key and value with their rotary and repeat_kv copies, and the
    # attention output. 12 is a generous count of those alive at once.
    width = max(shape.hidden_size, shape.num_attention_heads * shape.head_dim)
    states = 12 * tokens * width
    return 4 * (scores + mlp + states)


def pack_token_limit(shape: LayerShape) -> int:
    """Return the maximum number of tokens that one packed forward call may take, at least 1."""
    tokens = PACK_MAX_TOKENS
    while tokens > 1 and pack_activation_bytes(shape, tokens) > PACK_ACTIVATION_BYTES:
        tokens -= 1
    return tokens


def hidden_pass_bytes(shape: LayerShape, filled_parameters: int, compute_item_size: int, max_prompt_tokens: int) -> int:
    """Return the working memory of the hidden gate pass, without its libraries (see MODEL_CODE_BYTES).

    ``filled_parameters`` counts the layer parameters that are held whole in
    the compute dtype, which are all but the linear weights: norms and
    biases. Linear weights take one read buffer and one converted block at a
    time. A pack's activations come on top, and a prompt longer than a pack
    runs alone with activations of its own length.
    """
    weights = filled_parameters * compute_item_size + 2 * WEIGHT_BLOCK_BYTES
    tokens = max(pack_token_limit(shape), max_prompt_tokens)
    activations = pack_activation_bytes(shape, tokens)
    # glibc's heap keeps holes between forward calls that later, larger
    # tensors cannot reuse. With packs of 128 MiB on a Llama layer of hidden
    # size 2048, later calls peaked up to 60 MiB above the first one, so
    # half a pack is allowed for this.
    heap_slack = activations // 2
    return weights + activations + heap_slack


def cheap_embed_bytes(num_experts: int, hidden_size: int, chunk_size: int) -> int:
    """Return the working memory of the cheap_embed gate pass.

    Embedding rows are read one at a time into float32 sums, one per expert
    and prompt set, so prompts of any number and length fit.
    """
    return 2 * 4 * num_experts * hidden_size + min(chunk_size, 4 * hidden_size * 2)
