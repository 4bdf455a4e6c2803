"""Fields of a dense source config.json, grouped by how an output architecture treats them.

The metadata fields below carry no model computation, so dropping them
loses nothing when the config is rewritten for another architecture. The
decoder fields are carried over as they are. Any field not listed here, and
not handled by the output architecture, is an error rather than a silent
drop.
"""

# Names, versions and runtime switches written by transformers.
METADATA_FIELDS = frozenset(
    {
        "_name_or_path",
        "_model_name_or_path",
        "_attn_implementation_autoset",
        "_commit_hash",
        "architectures",
        "model_type",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "use_cache",
        "initializer_range",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "torchscript",
        "use_bfloat16",
        "tf_legacy_loss",
        "pruned_heads",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "is_decoder",
        "add_cross_attention",
        "cross_attention_hidden_size",
        "tie_encoder_decoder",
        "id2label",
        "label2id",
        "problem_type",
        "finetuning_task",
        "task_specific_params",
        "tokenizer_class",
        "prefix",
        "unk_token_id",
        "sep_token_id",
        "decoder_start_token_id",
        # pretraining_tp > 1 only splits Llama's matmuls into slices with the
        # same result, so the value does not change the model.
        "pretraining_tp",
    }
)

# Generation defaults that transformers 4.x saved into config.json. They
# belong in generation_config.json, which is copied from the base.
LEGACY_GENERATION_FIELDS = frozenset(
    {
        "max_length",
        "min_length",
        "do_sample",
        "early_stopping",
        "num_beams",
        "num_beam_groups",
        "diversity_penalty",
        "temperature",
        "top_k",
        "top_p",
        "typical_p",
        "repetition_penalty",
        "length_penalty",
        "no_repeat_ngram_size",
        "encoder_no_repeat_ngram_size",
        "bad_words_ids",
        "num_return_sequences",
        "output_scores",
        "return_dict_in_generate",
        "forced_bos_token_id",
        "forced_eos_token_id",
        "remove_invalid_values",
        "exponential_decay_length_penalty",
        "suppress_tokens",
        "begin_suppress_tokens",
    }
)

IGNORABLE_FIELDS = METADATA_FIELDS | LEGACY_GENERATION_FIELDS


# Fields of a Llama-style decoder that every output architecture carries
# over from the base as they are.
DECODER_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "attention_dropout",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "tie_word_embeddings",
    "initializer_range",
)
