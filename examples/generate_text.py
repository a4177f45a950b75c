"""Generate text with the Python API (mlx-lm's shape): load, then stream or generate.

    python examples/generate_text.py                      # the embedded Gemma 3 270M
    python examples/generate_text.py path/to/model.gguf   # any Gemma 3 GGUF, MLX or HF folder, repo id
"""

import sys

from mlx_gemma_qat import generate, load, stream_generate

model, tokenizer = load(sys.argv[1] if len(sys.argv) > 1 else None)

# The embedded 270M is a base (pre-trained) model: give it text to continue, without the chat template.
for response in stream_generate(model, tokenizer, "The three primary colours are", max_tokens=32, chat=False):
    print(response.text, end="", flush=True)
print(f"\n[{response.generation_tps:.1f} tok/s, peak {response.peak_memory:.2f} GB, {response.finish_reason}]")

# Logits for a token sequence, as with mlx-lm: model(tokens[None]) -> (1, length, vocab)
import mlx.core as mx

ids = tokenizer.encode("Paris is the capital of")
logits = model(mx.array(ids)[None])
print("next token:", repr(tokenizer.decode([int(logits[0, -1].argmax())])))

# Sampling with a seed, stop strings
print(generate(model, tokenizer, "Once upon a time", max_tokens=40, chat=False, temp=0.8, top_p=0.95, seed=0,
               stop_strings=["\n\n"]))
