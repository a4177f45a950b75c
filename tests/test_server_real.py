"""The real 270M behind ``mlx-gemma serve``, spoken to with the official ``openai`` client: a two-turn chat whose
second turn reuses the first turn's KV cache and answers as a fresh prompt of the whole conversation does."""

import openai
import pytest

from mlx_gemma_qat import generate, load
from test_server import _serve


@pytest.mark.real
def test_openai_chat_on_the_real_270m(real_270m):
    model, tok = load(real_270m)
    s = _serve(real_270m, model, tok)
    try:
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["gemma3-270m"]
        history, usage = [], []
        for text in ("Name a colour.", "Another one?"):
            history.append({"role": "user", "content": text})
            r = client.chat.completions.create(model="gemma3-270m", messages=history, max_tokens=6, temperature=0)
            reply = r.choices[0].message.content
            assert reply == generate(model, tok, history, 6)  # a fresh prompt of the whole conversation
            history.append({"role": "assistant", "content": reply})
            usage.append(r.usage)
        # the template re-tokenizes the model's own reply to the ids it generated: turn two reused all that turn one
        # left in its cache (its prompt and reply, but the last reply token, never fed back at max_tokens)
        first, second = usage
        assert first.completion_tokens == 6 and first.prompt_tokens_details.cached_tokens == 0
        assert second.prompt_tokens_details.cached_tokens == first.prompt_tokens + first.completion_tokens - 1
    finally:
        s.close()
