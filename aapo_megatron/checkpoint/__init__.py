"""On-disk checkpoint formats.

- `hf`: streaming reader of HF safetensors directories; `hf_writer`: size-capped shard writers, index, config;
- `mcore`: Megatron dist_checkpointing (torch_dist) save/load of a GPTModel at any TP/PP, plus the metadata that
  makes a checkpoint self-describing (`read_arch`); `extra_state`: loading that tolerates missing TE extra state;
- `manager`: trainer checkpoints (atomic, verified, `latest` pointer, keep-last-K);
- `conversion`: the streamed HF <-> Megatron conversions (aapo-convert's and aapo-eval's);
- `errors`: CheckpointError / CheckpointSaveError, ConversionError and its kinds.
"""
