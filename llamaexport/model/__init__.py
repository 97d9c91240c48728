"""The model and where it comes from: the config (sizes, RoPE), checkpoint loaders (Meta, Hugging Face,
GGUF, seeded random weights), PEFT LoRA adapters merged as the weights stream, tokenizers, chat formats
and tool-call formats (`tools`: prompts, grammar text, parsing; `schema`), the KV-cache form's one name
(`kv_form`), and the eager PyTorch reference that every artifact is checked against.

The ground floor: imports nothing else of llamaexport. torch is imported by `reference` (and lazily by
the loaders that need it); the runtime takes only config, tokenizer, chat, tools and kv_form from here.
"""
