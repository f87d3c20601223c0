"""HF <-> Megatron-Core checkpoint conversion.

- `mapping`: names, layouts, TP sharding and PP placement of the weights (pure tensor code);
- `hf_io`: streaming safetensors reader / size-capped shard writer;
- `mcore_io`: Megatron dist_checkpointing save/load of a GPTModel plus the metadata that makes a
  checkpoint self-describing (`read_arch`, `load_mcore_checkpoint`);
- `hf_to_mcore` / `mcore_to_hf`: the streamed conversions (W gloo worker processes, one PP stage each);
- `cli`: `aapo-convert hf-to-mcore | mcore-to-hf`.
"""
