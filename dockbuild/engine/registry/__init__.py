"""The OCI distribution client."""
