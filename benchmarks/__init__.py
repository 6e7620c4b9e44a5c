"""sdtrt's benchmarks: side-by-side timing against eager diffusers and Optimum's ONNX Runtime pipeline.

Never run by the test suite (the harness itself is tested on the tiny model, without speed assertions).
"""
