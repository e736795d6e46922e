"""llm-compressor recipes, one scheme a file; shipped as package data (moeq.schemes reads them)."""
