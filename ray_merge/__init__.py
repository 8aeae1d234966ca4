"""ray-merge: merge pretrained LLMs, in process or across a Ray cluster."""

__version__ = "0.1.0"
