"""Checkpoint loading (HF safetensors folders, GGUF files), tokenizers and chat templates.

Entry points: `checkpoint.load_checkpoint`, `tokenizer.load_tokenizer`. Nothing is imported here,
so the torch-free modules (`tokenizer`, `chat_template`, `detokenizer`) stay torch-free.
"""
