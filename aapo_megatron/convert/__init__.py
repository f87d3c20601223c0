"""The aapo-convert app: HF <-> Megatron-Core checkpoint conversion.

- `cli`: `aapo-convert hf-to-mcore | mcore-to-hf | gguf-to-hf`;
- `hf_to_mcore` / `mcore_to_hf`: the streamed conversions (W gloo worker processes, one PP stage each;
  `launch` starts them), `lazy_save` writes a checkpoint whose tensors are built as they are written;
- `gguf_to_hf`, `model_cache` (the cached demo model), `outdir` (atomic output directories), `memory`.

The weight contract is `models.mapping`; the on-disk formats are `checkpoint.hf` and `checkpoint.mcore`.
"""
