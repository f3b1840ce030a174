"""Vision-language models: the model, conversations, data and two-stage training (adapters: `vrlab.adapters`)."""
