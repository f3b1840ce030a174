"""LLM2CLIP: a caption-contrastively fine-tuned LLM as CLIP's text tower, and CLIP fine-tuning against it.

`text` (the bidirectional LLM text encoder), `losses`, `model` (the adapter and the CLIP-stage model) and
`train` (the stages, with the Trainer). The tasks are `llm2clip_text`, `llm2clip` and `retrieval`.
"""
