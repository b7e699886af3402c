"""TorchServe as servetool's engine: its config and process (process.py), the record of a running
server (state.py), its management API (management.py), the .mar (archive.py, preflight.py), the
helper beside it (pod.py), the canary split's HAProxy (split.py, split_runtime.py) and the
OpenAI/TEI clients' front (clients.py).
"""
