"""mathtir: reproduce and beat a Japanese math-LLM competition entry on your own cluster."""

__version__ = "0.1.0"
