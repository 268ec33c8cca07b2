"""Using a run's model interactively: the REST server and its web page (app, static/), the OpenAI-compatible chat
routes (openai_chat) and the terminal chat (repl)."""
