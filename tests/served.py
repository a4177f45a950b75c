"""A real server for tests: uvicorn on a free port of 127.0.0.1 in a background thread, the real engine."""

from __future__ import annotations

import threading
import time

from mlx_gemma_qat.server.app import ServerOptions, create_app, default_model_id, describe_model
from mlx_gemma_qat.server.engine import Engine, SamplingParams


class Served:
    """A uvicorn server running ``app`` on a free port in a background thread."""

    def __init__(self, app, engine, model, tokenizer, card):
        import uvicorn

        self.engine, self.model, self.tok, self.card = engine, model, tokenizer, card
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)


def serve(folder, model, tokenizer, *, options: ServerOptions | None = None, max_tokens: int = 16,
          **engine_options) -> Served:
    """``model`` (converted in ``folder``) served with ``options``, greedy with ``max_tokens`` by default."""
    engine = Engine(model, tokenizer, **engine_options)
    card = describe_model(model, tokenizer, folder, default_model_id(str(folder)))
    app = create_app(engine, card, defaults=SamplingParams(max_tokens=max_tokens), options=options)
    return Served(app, engine, model, tokenizer, card)
