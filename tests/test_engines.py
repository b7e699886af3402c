"""The engine interface (servetool/engines/base.py) and its registry: TorchServe implements every
method the interface names, and says where clients go as the targets always did."""

from __future__ import annotations

import inspect

import pytest

from servetool import engines
from servetool.engines.base import Engine
from servetool.engines.torchserve.engine import TorchServeEngine
from servetool.engines.torchserve.state import ServerState


def test_torchserve_is_the_registered_engine_and_implements_the_whole_interface():
    engine = engines.get("torchserve")
    assert isinstance(engine, TorchServeEngine) and engine.name == "torchserve"
    wanted = {name for name, _ in inspect.getmembers(Engine, inspect.isfunction)
              if not name.startswith("_")}
    assert wanted == {"build", "start", "stop", "register", "unregister", "set_default", "scale",
                      "describe", "predictions_url", "metrics_url"}
    for name in wanted:
        ours = inspect.signature(getattr(Engine, name)).parameters
        theirs = inspect.signature(getattr(TorchServeEngine, name)).parameters
        assert list(theirs) == list(ours), name
    with pytest.raises(KeyError, match="no engine 'kserve'"):
        engines.get("kserve")


def test_torchserve_urls():
    state = ServerState(run_dir="/tmp/run", pid=0, host="::1",
                        ports={"inference": 8080, "management": 8081, "metrics": 8082},
                        model_store="/tmp/store")
    engine = engines.get("torchserve")
    assert engine.predictions_url(state, "digits") == "http://[::1]:8080/predictions/digits"
    assert engine.predictions_url(state, "digits", "2.0") == \
        "http://[::1]:8080/predictions/digits/2.0"
    assert engine.metrics_url(state) == "http://[::1]:8082/metrics"
