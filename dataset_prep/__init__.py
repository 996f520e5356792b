"""Dataset preparation: atomic-file converters and the hooks that write LLM-derived feature files.

Installed as ``recbole_llmfuse.dataset_prep``.
"""
