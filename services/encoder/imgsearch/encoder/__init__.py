"""Encoder service: decodes images and runs the image and text ONNX models behind gRPC."""
