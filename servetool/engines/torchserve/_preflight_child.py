"""Run by preflight.py in a fresh interpreter: load an unpacked archive as a TorchServe worker does.

Only the standard library and TorchServe's own `ts` package are imported here, so a handler that
leans on anything servetool-specific fails now rather than on the server.
Usage: python _preflight_child.py MODEL_DIR REQUESTS_JSON; prints one JSON line on stdout.
"""

import base64
import importlib
import json
import os
import sys


def main() -> None:
    model_dir, requests_file = sys.argv[1], sys.argv[2]
    sys.path[0] = model_dir  # as the worker: the archive root first, not this script's folder
    os.chdir(model_dir)
    from ts.context import RequestProcessor
    from ts.model_loader import TsModelLoader

    with open(os.path.join("MAR-INF", "MANIFEST.json")) as f:
        manifest = json.load(f)
    with open(requests_file) as f:
        requests = json.load(f)
    model = manifest["model"]
    # TorchServe's loader hides a handler's ImportError behind a retry with its built-in handlers;
    # importing it first surfaces the real cause.
    importlib.import_module(model["handler"].split(":")[0].removesuffix(".py"))
    service = TsModelLoader().load(model["modelName"], model_dir, handler=model["handler"],
                                   gpu_id=None, batch_size=len(requests))
    data = []
    for r in requests:
        raw = base64.b64decode(r["body"])
        data.append({"body": json.loads(raw) if r["content_type"] == "application/json" else raw})
    context = service.context
    context.request_ids = {i: str(i) for i in range(len(data))}
    context.request_processor = [RequestProcessor({}) for _ in data]
    replies = service._entry_point(data, context)
    handlers_module = sys.modules.get("handlers")
    print(json.dumps({
        "replies": [{"status": context.get_response_status(i)[0] or 200, "body": _body(reply)}
                    for i, reply in enumerate(replies)],
        "servetool_imported": any(m.split(".")[0] == "servetool" for m in sys.modules),
        "handlers_from": os.path.dirname(getattr(handlers_module, "__file__", "") or ""),
    }))


def _body(reply):
    """A reply as the client reads it: the handler sends JSON bytes."""
    if isinstance(reply, (bytes, bytearray)):
        try:
            return json.loads(reply)
        except ValueError:
            return reply.decode("utf-8", "replace")
    return reply


if __name__ == "__main__":
    main()
