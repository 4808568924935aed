"""The session engine: the mutual labelled protocol and count-only mode."""
