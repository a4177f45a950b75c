"""A multi-turn chat with images: the KV cache carries over, so each turn prefills only its new tokens.

    python examples/chat_with_images.py MODEL IMAGE [IMAGE2]
        MODEL: a Gemma 3 vision model (4B/12B/27B): an MLX or Hugging Face folder, a repo id, or a text
        GGUF (then set MMPROJ=path/to/mmproj.gguf in the environment)
    python examples/chat_with_images.py        # the tiny random test checkpoint: shows the mechanics only

The tiny checkpoint's random replies (byte and unused tokens) do not re-tokenize to the ids it generated, so
its turns re-prefill everything; a real model's replies do, and later turns reuse the cache.
"""

import os
import sys
from pathlib import Path

from mlx_gemma_qat import ChatSession, load

here = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
model_path = sys.argv[1] if len(sys.argv) > 1 else here / "tiny_gemma3_vlm"
images = sys.argv[2:] or [here / "images" / "a.png", here / "images" / "wide.png"]

model, tokenizer = load(model_path, mmproj=os.environ.get("MMPROJ"))
# pan and scan also shows the model crops of elongated images (the tiny checkpoint's 256-token context is too short)
chat = ChatSession(model, tokenizer, system="Answer in one sentence.", pan_and_scan=len(sys.argv) > 1)
turns = [("What is in this picture?", images[:1]), ("And how does this one differ?", images[1:2]),
         ("Which of the two is wider?", [])]
for text, imgs in turns:
    print(f">> {text}" + (f"  [{', '.join(Path(i).name for i in imgs)}]" if imgs else ""))
    for r in chat.send(text, imgs, max_tokens=48 if len(sys.argv) > 1 else 8):
        print(r.text, end="", flush=True)
    print(f"\n   [{r.prompt_tokens} prompt tokens prefilled, {chat.reused_tokens} reused from the cache; "
          f"{r.generation_tps:.1f} tok/s]")
