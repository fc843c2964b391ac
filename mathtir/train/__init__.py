"""Stage 1 / stage 2 SFT: the recipe (recipe), the trainer (trainer), its sample stream (batches), loss and
throughput accounting. `mathtir train` (cli) is the entry point."""
