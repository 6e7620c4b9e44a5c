"""One module per network kind: its spec (a function of the model's config), its torch wrapper with
exactly the ONNX contract's inputs and outputs, and its loader (diffusers/transformers, imported
lazily so the runtime can read specs without them). Families compose these."""
