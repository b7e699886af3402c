"""The targets layer: where an engine runs (this machine, a Docker container, a Kubernetes
deployment): its processes, the serving image and the manifests. Each target offers the same few
verbs (up, down, running, status, scale, a client); the operate layer drives them.
"""
