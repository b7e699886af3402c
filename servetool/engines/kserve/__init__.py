"""The KServe engine: servetool's archives served in-process by KServe's ModelServer protocol stack.

No JVM and no per-request IPC: the same handler code TorchServe runs (handlers/entry.py, runtimes
x tasks) is called in the server process, one handler instance per worker (its own runtime
session, its own thread), fed by servetool's own dynamic batcher (max size, max delay: the Python
server has none). The server speaks
- servetool's own paths, as TorchServe answers them: POST /predictions/NAME[/VERSION], GET /ping,
  and the management subset servetool's client uses (/models: list, register from the model
  store only, describe, scale, set-default, unregister), so that every lifecycle command drives
  either engine through one client;
- the Open Inference Protocol v2 (/v2/models/NAME/infer) and KServe's v1 through KServe's own
  DataPlane and endpoints, so Triton and KServe clients work;
- Prometheus metrics with the handler's metric names and labels.

Modules: context (TorchServe's context, as the handler reads it), batcher, registry (models,
versions, workers), protocol (v1/v2 payloads <-> handler requests), app (the ASGI apps, token
auth), server (the process: `python -m servetool.engines.kserve.server CONFIG`).
"""
