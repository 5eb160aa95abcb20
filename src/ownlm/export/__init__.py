"""Writing models out: an HF safetensors folder, a GGUF file, or a PEFT adapter."""
