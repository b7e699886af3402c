"""The convert layer: a spec's model turned into a served format, and judged.

export/ (TorchScript, ONNX, .pt2, TensorRT, OpenVINO, int8), compress/ (prune, distil), the gate
(gate.py, detection_gate.py: parity and accuracy against the original) and reference/ (the
original library's own pipeline against the served path). Below it: the model layer only.
"""
