"""The aapo-convert app: HF <-> Megatron-Core checkpoint conversion.

- `cli`: `aapo-convert hf-to-mcore | mcore-to-hf | gguf-to-hf`;
- `gguf_to_hf`, `model_cache` (the cached demo model).

The conversions themselves are `checkpoint.conversion` (aapo-eval converts a Megatron checkpoint with them too);
the weight contract is `models.mapping`; the on-disk formats are `checkpoint.hf` and `checkpoint.mcore`.
"""
