"""A torch.export program's graph as layers pruning can rewrite.

A program's module calls aten operators on parameters it holds as plain attributes, so
torch-pruning (which follows nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.LayerNorm modules) sees no
layer. Each conv2d, linear, batch_norm and layer_norm call whose parameters belong to it alone is
put back as the torch.nn layer that owns them (same tensors, same names): the result is an
fx.GraphModule that trains (batch norm in training mode), prunes and exports like the class.
A program whose graph reshapes to fixed channel counts cannot be pruned this way; that is found
when pruning or exporting it, and said.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from servetool.convert.compress.common import CompressError

aten = torch.ops.aten


def program_layers(program) -> fx.GraphModule:
    """The program's module with its layers rebuilt (see the module's docstring)."""
    module = program.module()
    graph = module.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":  # the program's input checks:
            graph.erase_node(node)  # the rebuilt model is exported again, with its own
            continue
        build = BUILDERS.get(node.target) if node.op == "call_function" else None
        if build is not None:
            _rebuild(module, node, build)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    graph.lint()
    # a fresh GraphModule: the program's own refuses train() and eval()
    rebuilt = fx.GraphModule(module, graph, class_name="ProgramLayers")
    unowned = [name for name, p in rebuilt.named_parameters() if p.dim() > 1 and not _owned(rebuilt, name)]
    if unowned:
        raise CompressError(f"the program uses weights outside a convolution or linear layer "
                            f"({', '.join(unowned[:3])}): pruning would not know how they couple; "
                            "prune from the model class (source.state_dict) instead")
    return rebuilt.eval()


def _owned(module: nn.Module, name: str) -> bool:
    owner = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
    return isinstance(owner, (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm))


def _rebuild(module: fx.GraphModule, node: fx.Node, build) -> None:
    params = [a for a in node.args[1:] if isinstance(a, fx.Node)]
    owners = {p.target.rpartition(".")[0] for p in params if p.op == "get_attr"}
    if len(owners) != 1 or any(p.op != "get_attr" or len(p.users) != 1 for p in params):
        return  # shared or computed weights: left as they are
    owner_name = owners.pop()
    owner = module.get_submodule(owner_name)
    if type(owner) is not nn.Module or list(owner.children()):
        return
    tensors = [getattr(owner, p.target.rpartition(".")[2]) if isinstance(p, fx.Node) else None
               for p in node.args[1:]]
    layer = build(node, tensors, owner)
    if layer is None:
        return
    module.set_submodule(owner_name, layer)
    with module.graph.inserting_before(node):
        call = module.graph.call_module(owner_name, (node.args[0],))
    node.replace_all_uses_with(call)
    module.graph.erase_node(node)


def _arg(node: fx.Node, index: int, default):
    return node.args[index] if len(node.args) > index else default


def _conv(node: fx.Node, tensors: list, owner: nn.Module) -> nn.Module | None:
    weight, bias = tensors[0], tensors[1] if len(tensors) > 1 else None
    groups = _arg(node, 6, 1)
    if weight is None or weight.dim() != 4:
        return None
    layer = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                      stride=tuple(_arg(node, 3, [1, 1])), padding=tuple(_arg(node, 4, [0, 0])),
                      dilation=tuple(_arg(node, 5, [1, 1])), groups=groups, bias=bias is not None)
    layer.weight, layer.bias = weight, bias
    return layer


def _linear(node: fx.Node, tensors: list, owner: nn.Module) -> nn.Module | None:
    weight, bias = tensors[0], tensors[1] if len(tensors) > 1 else None
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer.weight, layer.bias = weight, bias
    return layer


def _batch_norm(node: fx.Node, tensors: list, owner: nn.Module) -> nn.Module | None:
    weight, bias, mean, var = (tensors + [None] * 4)[:4]
    if mean is None or var is None:
        return None
    rank = getattr(node.meta.get("val"), "ndim", 4)
    kind = nn.BatchNorm2d if rank == 4 else nn.BatchNorm1d
    layer = kind(mean.shape[0], eps=_arg(node, 7, 1e-5), momentum=_arg(node, 6, 0.1),
                 affine=weight is not None)
    if weight is not None:
        layer.weight, layer.bias = weight, bias
    layer.running_mean, layer.running_var = mean, var
    if hasattr(owner, "num_batches_tracked"):
        layer.num_batches_tracked = owner.num_batches_tracked
    return layer


def _layer_norm(node: fx.Node, tensors: list, owner: nn.Module) -> nn.Module | None:
    # args: input, normalized_shape, weight, bias, eps: tensors[0] is the shape (not a node)
    weight, bias = (tensors[1:] + [None, None])[:2]
    if weight is None:
        return None
    layer = nn.LayerNorm(list(node.args[1]), eps=_arg(node, 4, 1e-5), bias=bias is not None)
    layer.weight, layer.bias = weight, bias
    return layer


BUILDERS = {aten.conv2d.default: _conv, aten.linear.default: _linear,
            aten.batch_norm.default: _batch_norm, aten.layer_norm.default: _layer_norm}
