"""The engines layer: the model servers servetool runs (TorchServe today).
"""
