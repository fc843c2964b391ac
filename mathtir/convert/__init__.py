"""HF <-> megatron checkpoints: the weight mapping as typed rules (rules), the HF side's safetensors I/O
(safetensors), the checkpoint side's torch_dist regions (torch_dist), import, export, and the identity + logits
parity check (verify). `mathtir convert` (cli) is the entry point."""
