"""The outbound data plane, independent of any HTTP client library."""
