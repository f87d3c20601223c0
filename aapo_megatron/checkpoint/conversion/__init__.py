"""The streamed HF <-> Megatron-Core conversions, a library for the aapo-convert app and for aapo-eval.

- `hf_to_mcore` / `mcore_to_hf`: the conversions (W gloo worker processes, one PP stage each; `launch` starts
  them); `lazy_save` writes a checkpoint whose tensors are built as they are written;
- `outdir` (atomic output directories), `memory` (live-tensor accounting, a lean Megatron import).
"""
