"""What each network and each model family is, written once.

  spec.py        TensorSpec / ComponentSpec: a network's ONNX contract (symbolic dims, dtypes, tolerance)
  components/    one module per network kind: spec = f(model config), torch wrapper, loader
  families/      sd.py, sdxl.py, taiyi.py, upscale.py, depth.py, unclip.py: which components, which tokenizers,
                 how conditioning is built (from text, and from images)
  presets.py     `sdtrt make-model`: diffusers folders with real architectures and random weights

Export, validation, engine profiles, the manifests and the runtime all read these; none of them
names a component in an if-chain.
"""
