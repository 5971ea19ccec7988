"""ReliAPI: a self-hosted reliability gateway for HTTP and LLM APIs."""

__version__ = "0.1.0"
