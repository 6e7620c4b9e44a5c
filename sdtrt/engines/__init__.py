"""ONNX -> TensorRT / TensorRT-RTX engines: `build_engines(onnx_dir, out)`.

  toolkit.py   one adapter over `tensorrt` and `tensorrt_rtx` (module names, targets, logger)
  profiles.py  optimization profiles from the user's ranges, generic over the specs' symbolic dims
  builder.py   one engine, built in a worker process (so Ctrl-C stops it at once), phases as progress
  build.py     every component, the content-keyed engine cache, and engines.json (via sdtrt.artifacts)
"""
