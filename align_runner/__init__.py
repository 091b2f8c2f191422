"""align_runner: declarative LLM post-training pipelines on one engine."""

__version__ = "0.1.0"
