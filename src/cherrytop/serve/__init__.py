"""`cherrytop serve`: the assistant behind an OpenAI-compatible API and a web chat.

- engine.py      dynamic batching: one generation loop with a shared KV cache, bounded queue, cancellation
- protocol.py    the OpenAI chat-completions wire format: requests, responses, stream chunks, errors
- moderation.py  the policy file (categories, patterns, optional classifier), reloaded on change
- feedback.py    ratings bound to what was served: the record of served answers, the rate limit, the store
- app.py         the FastAPI app: /v1/chat/completions, /v1/models, /v1/feedback, the chat page, limits
- chat.html      the web chat page (multi-turn, streaming, thumbs up / down and report);
  static/        its script and style (chat.js, chat.css)
"""
