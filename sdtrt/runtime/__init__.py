"""The lean runtime: tokenizer, schedulers, backends and the pipeline. Imports torch and the standard
library only (plus a backend library, lazily); never diffusers or transformers."""
