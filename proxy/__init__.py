"""satroute proxy: an OpenAI-compatible HTTP service that routes each chat request with Model-SAT."""
