"""prep.trainer: train, sample and evaluate an encoder-conditioned text-to-image diffusion model
on the shard contract v1 ("Taming Encoder for Zero Fine-tuning Image Customization").

Modules (import what you need; nothing heavy is imported here):
  data      TripletStream: contract-v1 shards -> mixed (r), cross-referenced (ω), φ, text-drop batches
  model     TextEncoder (frozen open_clip text tower), UNet (text + object cross-attention), Diffusion
  train     TrainConfig, train(config) -> dict
  sample    Customizer, sample(checkpoint, reference, prompt, out_path) -> dict
  evaluate  evaluate(checkpoint, references, prompts) -> rows, format_table(rows)
  cli       register(app): adds `train`, `sample`, `evaluate` to a Typer app
"""
