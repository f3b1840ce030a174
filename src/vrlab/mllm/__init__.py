"""Vision-language models: adapters (projectors), conversations, data, training."""
