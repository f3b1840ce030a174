"""lmms-eval resolves `!function utils.<name>` next to the task YAML; the code lives in `vrlab.eval.local`."""

from vrlab.eval.local import DataTask, doc_to_choice, doc_to_text, doc_to_visual, exact_match

__all__ = ["DataTask", "doc_to_choice", "doc_to_text", "doc_to_visual", "exact_match"]
