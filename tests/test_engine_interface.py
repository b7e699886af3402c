"""The engine interface (servetool/engines/base.py) and its registry: TorchServe implements every
method the interface names, and says where clients go as the targets always did."""

from __future__ import annotations

import inspect

import pytest

from servetool import engines
from servetool.engines.base import Engine
from servetool.engines.kserve.engine import KServeEngine
from servetool.engines.torchserve.engine import TorchServeEngine
from servetool.engines.torchserve.state import ServerState


@pytest.mark.parametrize("name", ["torchserve", "kserve"])
def test_each_registered_engine_implements_the_whole_interface(name):
    engine = engines.get(name)
    assert engine.name == name and isinstance(engine, TorchServeEngine if name == "torchserve"
                                              else KServeEngine)
    wanted = {n for n, _ in inspect.getmembers(Engine, inspect.isfunction) if not n.startswith("_")}
    assert wanted == {"build", "start", "stop", "register", "unregister", "set_default", "scale",
                      "describe", "predictions_url", "metrics_url"}
    for method in wanted:
        ours = inspect.signature(getattr(Engine, method)).parameters
        theirs = inspect.signature(getattr(type(engine), method)).parameters
        assert list(theirs) == list(ours), method
    with pytest.raises(KeyError, match="no engine 'triton'"):
        engines.get("triton")


def test_torchserve_urls():
    state = ServerState(run_dir="/tmp/run", pid=0, host="::1",
                        ports={"inference": 8080, "management": 8081, "metrics": 8082},
                        model_store="/tmp/store")
    engine = engines.get("torchserve")
    assert engine.predictions_url(state, "digits") == "http://[::1]:8080/predictions/digits"
    assert engine.predictions_url(state, "digits", "2.0") == \
        "http://[::1]:8080/predictions/digits/2.0"
    assert engine.metrics_url(state) == "http://[::1]:8082/metrics"
