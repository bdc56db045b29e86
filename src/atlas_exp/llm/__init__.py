"""Talking to chat models over HTTP: the OpenAI-compatible client (retries, reply cache, prices) and the
embedded llama.cpp server. Used by the oracle judge (selectors) and by `policy=openai` (eval)."""
