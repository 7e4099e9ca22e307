"""The HTTP server: Ollama's API (ollama.py) and OpenAI's (openai.py) on FastAPI/uvicorn (app.py),
over the model manager (models.py), the request lifecycle against the engine (jobs.py) and the
validation both share (protocol.py)."""
