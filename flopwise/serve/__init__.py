"""``flopwise serve``: a run's model behind OpenAI's HTTP API and a web chat page (the ``serve`` extra)."""
