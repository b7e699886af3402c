"""Serving engines: TorchServe (the default) and KServe's protocol stack in-process."""
