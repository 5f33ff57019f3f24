"""tunesmith: fine-tune small chat models on your own conversations, then chat with and serve them."""

__version__ = "0.1.0"
