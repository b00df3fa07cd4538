"""meshkit: Envoy/Istio sidecars and proxy filters for LLM and embedding APIs."""

__version__ = "0.1.0"
