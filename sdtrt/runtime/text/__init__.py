"""Prompts to token ids, with the standard library and ftfy only: the CLIP BPE tokenizer (ids equal to
transformers'), its text clean-up, and the opt-in A1111 prompt syntax (weights, long prompts)."""
