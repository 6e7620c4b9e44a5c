"""ONNX -> TensorRT / TensorRT-RTX engines: profiles from user ranges, one builder for both
libraries, an engine cache, and the engines.json manifest the runtime checks before loading."""
