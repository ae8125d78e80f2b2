"""Model files and their runtime: export (build time), manifest, decoding and ONNX Runtime sessions (run time)."""
