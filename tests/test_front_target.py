"""The front's one canonical form of a request target, against TorchServe's own parsing.

TorchServe reads a target with Netty's QueryStringDecoder (the path decoded once and split at '/',
parameters decoded once with '+' as a space). tests/torchserve_parse/TargetParse.java runs those
very classes from TorchServe's jar. For every target the front accepts, TorchServe must read the
target the front forwards as the same resource and parameters the front checked, and the client's
own target must mean the same to both (so nothing the front refused could reach TorchServe
another way). Hypothesis builds the targets from the pieces bypasses are made of.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import ts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from servetool.engines.torchserve import pod

JAR = Path(ts.__file__).parent / "frontend" / "model-server.jar"
PARSER = Path(__file__).parent / "torchserve_parse" / "TargetParse.java"


class TorchServeParser:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(["java", "-cp", str(JAR), str(PARSER)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def parse(self, target: str) -> dict:
        self.proc.stdin.write(json.dumps(target).encode() + b"\n")
        self.proc.stdin.flush()
        while True:
            line = self.proc.stdout.readline()
            assert line, "the parser ended"
            if line.startswith(b"@@"):
                return json.loads(line[2:].decode("utf-8"))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def torchserve_parser():
    if not shutil.which("java"):
        pytest.fail("java is needed (TorchServe's frontend), see README")
    parser = TorchServeParser()
    yield parser
    parser.close()


def same_meaning(parsed: dict, target: pod.Target) -> bool:
    return "error" not in parsed and parsed["segments"] == target.segments and \
        parsed["params"] == {k: [v] for k, v in target.params.items()}


# What bypasses are made of: the resources and names the front decides on, every way of writing a
# '/', '\', '.', '%' and the letters of "models" (encoded, double-encoded, mixed case, overlong
# UTF-8), separators other decoders split at, controls and invisible characters.
PIECES = ["models", "workflows", "token", "api-description", "set-default", "digits", "1.0",
          "evil", "all", "/", "//", ".", "..", "%2F", "%2f", "%252F", "%5C", "%5c", "\\", "%2e",
          "%2E", "%2e%2e", "%252e", "%6d", "%6D", "%6dodels", "m%6fdels", "MODELS", "%", "%%",
          "%zz", "%C0%AF", "%c0%ae", "%E2%80%AE", "%00", "%0a", "%0D%0A", "%09", "%7F", "%20", "+",
          ";", ";a=b", "#", "?", "&", "=", "%3F", "%26", "%3D", "%3B", "%23", "~", ":", "@", "é",
          "%C3%A9", "%EF%BC%8F", "file:", "http:", "tmp", "x.mar", "digits.mar"]
PARAM_NAMES = ["url", "model_name", "handler", "initial_workers", "synchronous", "type",
               "min_worker", "u%72l", "url%00", "", "URL", "runtime"]


def _joined(parts: list[str]) -> str:
    return "".join(parts)


segment = st.lists(st.sampled_from(PIECES), min_size=0, max_size=4).map(_joined)
path = st.lists(segment, min_size=0, max_size=5).map(lambda segs: "/" + "/".join(segs))
param = st.tuples(st.sampled_from(PARAM_NAMES), st.sampled_from(["=", "", "=="]),
                  st.lists(st.sampled_from(PIECES), max_size=4).map(_joined))
query = st.lists(param, max_size=4).map(lambda ps: "&".join(n + eq + v for n, eq, v in ps))
targets = st.tuples(path, st.sampled_from(["", "?"]), query).map(
    lambda t: t[0] + (t[1] + t[2] if t[1] else ""))


@settings(max_examples=1200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(targets)
def test_what_the_front_forwards_torchserve_reads_as_the_front_checked_it(torchserve_parser,
                                                                          target):
    try:
        checked = pod.canonical_target(target)
    except pod.TargetError:
        return  # refused: nothing reaches TorchServe
    forwarded = torchserve_parser.parse(checked.rebuilt)
    assert same_meaning(forwarded, checked), (target, checked, forwarded)
    # and the client's own bytes mean the same to TorchServe as to the front
    original = torchserve_parser.parse(target)
    assert same_meaning(original, checked), (target, checked, original)
    # forwarding is stable: the rebuilt target is its own canonical form
    assert pod.canonical_target(checked.rebuilt) == checked


@settings(max_examples=600, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40))
def test_any_printable_target_is_read_alike_or_refused(torchserve_parser, tail):
    target = "/" + tail
    try:
        checked = pod.canonical_target(target)
    except pod.TargetError:
        return
    assert same_meaning(torchserve_parser.parse(target), checked), (target, checked)
    assert same_meaning(torchserve_parser.parse(checked.rebuilt), checked)


@pytest.mark.parametrize("target, why", [
    ("/models%2F?url=/any/folder", "encoded '/'"),          # issue 22: TorchServe reads /models/
    ("/models%2f?url=/any/folder", "encoded '/'"),
    ("/workflows%2F?url=/any/folder", "encoded '/'"),
    ("/models%5C?url=x", "encoded '/' or '\\\\'"),
    ("/models%252F?url=x", "encoded '%'"),                  # double encoding
    ("/models/%2e%2e/models", "'..'"),
    ("/./models", "'.'"),
    ("//models", "empty"),
    ("/models;a=b?url=x", "';'"),
    ("/models?initial_workers=1;url=/x", "';'"),
    ("/models?url=x&url=y", "more than once"),
    ("/models?url=%5Ctmp", "a '\\\\'"),
    ("/models?url=%C0%AFetc", "UTF-8"),                    # overlong '/'
    ("/models%00", "control"),
    ("/models?model_name=a%0A", "control"),                # a name ending in a newline
    ("/models?model_name=a%E2%80%AE", "format"),           # right-to-left override
    ("/models?url=%zz", "does not start an escape"),
    ("http://127.0.0.1/models?url=/x", "starting with '/'"),
    ("/models#?url=/x", "'#'"),
])
def test_known_bypasses_are_refused_with_the_reason(target, why):
    with pytest.raises(pod.TargetError, match=why.replace("(", r"\(").replace("'", "'")):
        pod.canonical_target(target)


def test_plain_and_singly_encoded_targets_pass_rebuilt():
    checked = pod.canonical_target("/%6Dodels?url=digits.mar&model_name=a+b&synchronous")
    assert checked.segments == ["", "models"]
    assert checked.params == {"url": "digits.mar", "model_name": "a b", "synchronous": ""}
    assert checked.rebuilt == "/models?url=digits.mar&model_name=a%20b&synchronous="
    assert pod.canonical_target("/").rebuilt == "/" and pod.canonical_target("/").segments == []
    assert pod.canonical_target("/models/").segments == ["", "models"]  # as Java's split reads it


def test_an_encoded_slash_in_a_parameter_is_a_slash_and_the_store_check_refuses_it(tmp_path):
    """TorchServe splits the query before decoding it, so `%2F` in a value is just '/': the front
    reads it so too, and the registration check (not the target check) refuses a path."""
    checked = pod.canonical_target("/models?url=%2Ftmp%2Fevil")
    assert checked.params == {"url": "/tmp/evil"}
    assert pod.canonical_target(checked.rebuilt) == checked
    assert "file name" in pod.registration_problem(checked.query, tmp_path)
