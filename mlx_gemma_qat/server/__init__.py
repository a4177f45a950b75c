"""``mlx-gemma serve``: a local HTTP server speaking OpenAI's API (/v1) and Ollama's (/api).

``engine`` runs the requests (one worker thread, concurrent requests, KV caches kept for reuse); ``app``
is the Starlette application around it, ``openai_api`` and ``ollama_api`` its two APIs, and ``prompts``
reads what a request asks for (messages, images, fields) into token ids and image sources.
"""
