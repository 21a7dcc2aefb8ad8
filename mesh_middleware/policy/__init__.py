"""Policy files: schema, loading with line numbers, compilation into matchers, explanation.

Pure: no network, no framework, no threads.
"""
