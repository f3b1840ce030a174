"""The demo's own models: tiny random encoders of every family (`tiny_encoders`) and a tiny LLM (`tiny_llm`).

They are built from small configs through each library's public API and saved with its own save call, so the
demo and the tests load them back through exactly the paths real checkpoints take.
"""
