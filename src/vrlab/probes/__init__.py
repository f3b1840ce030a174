"""LMVR probes: LLM hidden-state features, linear probes, attention maps."""
