"""ISPF Match client: the SDK for a province's systems, and the `ispf` CLI."""

from ispf_client.sdk import ClientProfile, NodeClient

__all__ = ["ClientProfile", "NodeClient"]
