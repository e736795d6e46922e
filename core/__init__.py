"""moeq: quantize Mixture-of-Experts LLMs with llm-compressor and measure what it buys through vLLM and lm-eval.

This package (folder core/) is the shared core both stages import and that imports neither: errors, the
MOEQ_ environment, the model registry, schemes (recipes + compressed-tensors' resolved config), atomic
writes, identity, the corpus and the roofline. moeq.quantize builds and quantizes; moeq.evaluate measures
into the ledger; moeq.evaluate.report reads only the ledger. moeq.cli is the one command.
"""
