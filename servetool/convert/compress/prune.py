"""Structured pruning with torch-pruning: whole channels (and attention head dimensions, MLP
neurons) removed through its dependency graph, so the layers a residual add, a concatenation or a
depthwise convolution couples lose the same channels and the model stays valid and dense.

A target (a speed-up in MACs, or a MACs or parameter ratio) is met by searching the channel ratio:
each try prunes a copy, and the smallest ratio that meets it wins. What a step removed is kept as
torch-pruning's pruning history (module names and channel indices: plain data that a checkpoint
holds without pickled code), which `replay` applies again to a fresh copy of the original.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from servetool.convert.compress.common import CompressError
from servetool.errors import whole_cause
from servetool.model.spec import PruneOptions

GRID = tuple(round(0.1 * i, 1) for i in range(1, 10))  # channel ratios tried first
SEARCH_ROUNDS = 5  # then bisections between two grid points: within 0.3%


def _tp():
    """torch-pruning, or one line saying how to install it (an optional extra)."""
    try:
        import torch_pruning
    except ImportError:
        raise CompressError("servetool compress needs torch-pruning (pruning, and counting MACs): "
                            "pip install 'servetool[compress]'") from None
    return torch_pruning


@dataclass
class Pruned:
    model: nn.Module
    history: list[list]  # [module name, out channels?, [channel indices]] in the order applied
    macs: int
    params: int
    ratio: float  # the channel ratio that met the step's target


def count(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """(MACs, parameters) of one example through the model, as torch-pruning counts them."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        was_training = model.training
        macs, params = _tp().utils.count_ops_and_params(model.eval(), example)
        model.train(was_training)
    return int(macs), int(params)


def channels(model: nn.Module) -> int:
    """Output channels (features) of every convolution and Linear: what pruning takes from."""
    return sum(m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features
               for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)))


def keep_names(model: nn.Module, options: PruneOptions) -> list[str]:
    """The modules kept whole: those the spec names (each must exist), or the classifier head
    (the last Linear; the last convolution in a model without one)."""
    modules = dict(model.named_modules())
    if options.keep is not None:
        for name in options.keep:
            if name not in modules or not name:
                near = ", ".join(n for n in list(modules)[1:] if n)[:300]
                raise CompressError(f"compress.prune.keep names {name!r}, which is not a module "
                                    f"of the model (its modules: {near})")
        return list(options.keep)
    for kinds in ((nn.Linear,), (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        heads = [name for name, m in modules.items() if isinstance(m, kinds)]
        if heads:
            return [heads[-1]]
    raise CompressError("the model has no Linear or convolution layer for pruning to remove "
                        "channels from")


def prune_to(model: nn.Module, example: torch.Tensor, options: PruneOptions, keep: list[str],
             goal: float, base: tuple[int, int],
             gradients: Callable[[nn.Module], None] | None = None) -> Pruned:
    """A pruned copy of `model` whose MACs (or parameters) are at most `goal` times the
    original's `base`, with the fewest channels removed that reach it.

    The channel ratio is searched on a grid, then bisected between the last grid point that
    falls short and the first that meets the goal. Not bisected from the start: rounding to
    round_to makes the result non-monotonic near the top (16 channels at 0.9 round to none
    left, so torch-pruning removes none)."""
    tried: list[Pruned] = []
    for ratio in GRID:
        if ratio > options.max_layer_ratio:
            break
        tried.append(_attempt(model, example, options, keep, ratio, gradients))
        if _fraction(tried[-1], base, options) <= goal:
            break
    else:
        tried.append(_attempt(model, example, options, keep, options.max_layer_ratio, gradients))
    if _fraction(tried[-1], base, options) > goal:
        reached = min(_fraction(t, base, options) for t in tried)
        raise CompressError(
            f"compress.prune.{options.target} {options.value:g} cannot be met: removing up to "
            f"{options.max_layer_ratio:.0%} of every prunable layer's channels gives "
            f"{_describe(reached, options)} (layers kept whole: {', '.join(keep)}; channels go "
            f"in multiples of compress.prune.round_to {options.round_to}; other layers may be "
            "coupled to kept ones): ask for less, lower round_to, or raise "
            "compress.prune.max_layer_ratio")
    low = tried[-2].ratio if len(tried) > 1 else 0.0
    high, best = tried[-1].ratio, tried[-1]
    for _ in range(SEARCH_ROUNDS):
        middle = (low + high) / 2
        attempt = _attempt(model, example, options, keep, middle, gradients)
        if _fraction(attempt, base, options) <= goal:
            high, best = middle, attempt
        else:
            low = middle
    return best


def _fraction(pruned: Pruned, base: tuple[int, int], options: PruneOptions) -> float:
    """What is left of the original: MACs for speedup and macs_ratio, else parameters."""
    return pruned.params / base[1] if options.target == "params_ratio" else pruned.macs / base[0]


def _describe(fraction: float, options: PruneOptions) -> str:
    if options.target == "speedup":
        return f"at most a {1 / fraction:.2f}x speed-up in MACs"
    return f"at best {fraction:.3f} of the original's " + (
        "parameters" if options.target == "params_ratio" else "MACs")


def importance(name: str):
    tp = _tp()
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    return tp.importance.GroupMagnitudeImportance(p=1 if name == "l1" else 2)


def _attempt(model: nn.Module, example: torch.Tensor, options: PruneOptions, keep: list[str],
             ratio: float, gradients: Callable[[nn.Module], None] | None) -> Pruned:
    """Prune a copy of `model` at one channel ratio; the model itself is untouched."""
    tp = _tp()
    trial = copy.deepcopy(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            pruner = tp.pruner.MetaPruner(
                trial, example, importance=importance(options.importance), pruning_ratio=ratio,
                ignored_layers=[trial.get_submodule(n) for n in keep],
                round_to=options.round_to, max_pruning_ratio=options.max_layer_ratio)
            if gradients is not None:
                gradients(trial)
            pruner.step()
        except CompressError:
            raise
        except Exception as exc:
            raise CompressError(f"torch-pruning could not prune this model: {whole_cause(exc)}; "
                                "name the layer it fails on in compress.prune.keep") from None
    history = [[str(name), bool(out), [int(i) for i in idx]]
               for name, out, idx in pruner.pruning_history()]
    trial.zero_grad(set_to_none=True)
    try:
        counted = count(trial, example)
    except Exception as exc:
        raise CompressError(f"the model no longer runs once pruned ({whole_cause(exc, 200)}): it "
                            "probably reshapes to a fixed number of channels (x.view(batch, N)); "
                            "write that as torch.flatten(x, 1), or name the layer before the "
                            "reshape in compress.prune.keep") from None
    return Pruned(trial, history, *counted, ratio)


def replay(model: nn.Module, example: torch.Tensor, histories: list[list[list]]) -> nn.Module:
    """Apply saved pruning steps to a fresh copy of the original, in the order they were made
    (each step's channel indices refer to the model as the step before left it)."""
    tp = _tp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for history in histories:
            graph = tp.DependencyGraph().build_dependency(model.eval(), example_inputs=example)
            try:
                graph.load_pruning_history(history)
            except Exception as exc:
                raise CompressError("the checkpoint's pruning does not fit this model (was the "
                                    f"model changed since?): {whole_cause(exc)}") from None
    return model


def step_goals(options: PruneOptions) -> list[float]:
    """What is left of the original (MACs or parameters) after each step: the target reached
    in equal factors, so every step removes the same share of what the last one left."""
    final = 1 / options.value if options.target == "speedup" else options.value
    return [final ** ((i + 1) / options.steps) for i in range(options.steps)]
