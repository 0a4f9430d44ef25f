"""narthex.inference: Model repository, dynamic batching and ONNX Runtime serving."""
