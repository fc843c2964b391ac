"""The megatron-core runtime that training and conversion both stand on: process groups (parallel), the CPU
compatibility layer (compat, applied once by parallel.initialize), the checkpoint directory (checkpoint) and
the GPTModel builder (model)."""
