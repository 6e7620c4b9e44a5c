"""The lean runtime: a validated `Request` -> images, on any backend.

  request.py   the call's parameters, validated once; shared by the API, CLI, benchmarks and server
  pipeline.py  the stages: conditioning (the family's) -> start latents -> denoise -> VAE decode
  denoise.py   the loop and its step hooks (inpainting, progress, cancellation, extra UNet inputs)
  latents.py   start latents for txt2img / img2img / inpainting, drawn in diffusers' generator order
  text/        CLIP BPE and WordPiece (BERT) tokenizers, prompt clean-up (ftfy), A1111 prompt syntax, per-encoder embedding
  schedulers/  one file per sampler, numbers equal to diffusers'
  backends/    onnxruntime and tensorrt behind one protocol (torch tensors in and out)

Imports torch, the standard library and ftfy (plus a backend library, lazily); never diffusers or
transformers (a test enforces it).
"""
