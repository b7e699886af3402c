"""Only archives in the model store load: the management front against a real TorchServe.

TorchServe 0.12 loads a model from any directory given as a plain path, whatever allowed_urls says.
Each attack below is tried through the management port (servetool's front); the first test also
shows that the same request sent to TorchServe's own socket would register, so the hole is real
and the front is what closes it.
"""

from __future__ import annotations

import http.client
import json
import shutil
import stat
import zipfile
from pathlib import Path
from urllib.parse import quote

import pytest

from servetool.engines.torchserve import pod, process
from servetool.targets.local import LocalTarget
from tests.conftest import server_options


def front_key(state) -> str:
    return json.loads((Path(state.run_dir) / pod.FRONT_KEY_FILE).read_text())["management"]["key"]


def torchserve_key(state) -> str:
    return json.loads(Path(state.key_file).read_text())["management"]["key"]


def front(state, method: str, target: str, key: str | None = "front", body: bytes | None = None):
    key = front_key(state) if key == "front" else key
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    conn = http.client.HTTPConnection("127.0.0.1", state.ports["management"], timeout=60)
    try:
        conn.request(method, target, body=body, headers=headers)
        reply = conn.getresponse()
        return reply.status, reply.read(), {k.lower(): v for k, v in reply.getheaders()}
    finally:
        conn.close()


def direct(state, method: str, target: str):
    """TorchServe's own management API, as only the server's user can reach it."""
    conn = pod.UnixHTTPConnection(str(Path(state.run_dir) / "private" / "management.sock"), 60)
    try:
        conn.request(method, target, headers={"Authorization": f"Bearer {torchserve_key(state)}"})
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


def registered(state) -> set[str]:
    status, body, _ = front(state, "GET", "/models")
    assert status == 200
    return {m["modelName"] for m in json.loads(body)["models"]}


@pytest.fixture(scope="module")
def outside(tmp_path_factory, model_store):
    """An unpacked archive outside the store whose handler leaves a mark when it is imported."""
    folder = tmp_path_factory.mktemp("outside") / "evil"
    with zipfile.ZipFile(model_store / "digits.mar") as zf:
        zf.extractall(folder)
    mark = folder.parent / "handler-ran"
    entry = folder / "entry.py"
    entry.write_text(f"open({str(mark)!r}, 'w').write('ran')\n" + entry.read_text())
    return folder, mark


def test_every_way_around_the_model_store_is_refused(served, outside, model_store, tmp_path):
    state = served[0].running()
    folder, mark = outside
    (model_store / "linked.mar").symlink_to(model_store / "digits.mar")
    shutil.copyfile(model_store / "digits.mar", tmp_path / "copy.mar")
    try:
        attacks = [
            f"/models?url={folder}&model_name=evil",                     # a directory anywhere
            f"/models?url=file://{folder}&model_name=evil",              # as file:// URL
            f"/models?url=file:{folder}&model_name=evil",                # file: with one slash
            f"/models?url=file://{tmp_path}/copy.mar&model_name=evil",   # a .mar outside the store
            f"/models?url={tmp_path}/copy.mar&model_name=evil",
            "/models?url=..%2F..%2Fevil&model_name=evil",                # traversal
            "/models?url=file:///x/%252e%252e/evil.mar&model_name=evil",
            "/models?url=http://127.0.0.1:9/evil.mar&model_name=evil",   # a download
            "/models?url=linked.mar&model_name=evil",                    # a link in the store
            "/models?url=digits.mar&model_name=evil&handler=os",         # another handler
            "/models?url=digits.mar&url=/tmp/evil&model_name=evil",      # two urls
            f"/%6dodels?url={folder}&model_name=evil",                   # an encoded path
            f"/models%2F?url={folder}&model_name=evil",                  # issue 22: encoded '/'
            f"/models%2f?url={folder}&model_name=evil&handler=os",
            f"/models%252F?url={folder}&model_name=evil",                # double encoding
            f"/models/?url={folder}&model_name=evil",                    # what %2F decodes to
            f"//models?url={folder}&model_name=evil",
            f"/./models?url={folder}&model_name=evil",
            f"/x/%2e%2e/models?url={folder}&model_name=evil",
            f"/models;x=1?url={folder}&model_name=evil",
            f"/models?url={quote(str(folder), safe='')}&model_name=evil",
            f"/models?url=%C0%AF{folder}&model_name=evil",                # overlong '/'
            f"/models?u%72l={folder}&model_name=evil",                   # an encoded name
            "/models?url=digits.mar&model_name=evil%0A",                  # a name with a newline
            f"/workflows%2F?url={folder}&workflow_name=evil",
            f"/workflows%2f{folder}?workflow_name=evil",
            f"/models?initial_workers=1;url={folder}&url=digits.mar&model_name=evil",
            f"/workflows?url={folder}&workflow_name=evil",
        ]
        for target in attacks:
            status, body, _ = front(state, "POST", target)
            assert status in (400, 403, 404), (target, status, body)
            assert "error" in json.loads(body), body
        status, body, _ = front(state, "POST", "/models", body=json.dumps(
            {"url": str(folder), "model_name": "evil"}).encode())
        assert status == 400 and "query string" in json.loads(body)["error"]
        assert "evil" not in registered(state) and not mark.exists()

        # The same request straight to TorchServe's own socket registers: the front is what stops it.
        status, body = direct(state, "POST", f"/models?url={folder}&model_name=evil&initial_workers=0")
        assert status == 200, body
        assert "evil" in registered(state)
    finally:
        direct(state, "DELETE", "/models/evil")
        (model_store / "linked.mar").unlink()
    assert not mark.exists()  # registered with no worker: its handler never ran


def test_torchserve_management_is_reachable_only_through_the_front(served):
    state = served[0].running()
    props = process.read_properties(Path(state.run_dir) / "config.properties")
    socket_path = Path(state.run_dir) / "private" / "management.sock"
    assert props["management_address"] == f"unix:{socket_path}"
    assert props["workflow_store"] == f"{state.model_store}/.servetool-no-workflows"
    assert stat.S_ISSOCK(socket_path.stat().st_mode)
    assert stat.S_IMODE(socket_path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((Path(state.run_dir) / pod.FRONT_KEY_FILE).stat().st_mode) == 0o600
    # the management port is the front, and TorchServe's own management key does not open it
    status, _, headers = front(state, "GET", "/models", key=torchserve_key(state))
    assert status == 401 and headers["www-authenticate"] == 'Bearer realm="servetool-management"'
    assert front(state, "GET", "/models", key=None)[0] == 401
    status, body, _ = front(state, "GET", "/models/digits")
    assert status == 200 and json.loads(body)[0]["modelName"] == "digits"
    # a registration of an archive in the store goes through, with the parameters servetool uses
    status, body, _ = front(state, "POST", "/models?url=digits.mar&model_name=digits_copy"
                                           "&initial_workers=1&synchronous=true")
    assert status == 200, body
    assert front(state, "DELETE", "/models/digits_copy")[0] == 200


def test_a_dot_in_the_store_path_is_not_a_wildcard_in_allowed_urls(tmp_path, model_store):
    """allowed_urls is written escaped, as Java reads it: `store.d` does not match `storeXd`."""
    store = tmp_path / "store.d"
    store.mkdir()
    shutil.copyfile(model_store / "digits.mar", store / "digits.mar")
    twin = tmp_path / "storeXd"
    twin.mkdir()
    shutil.copyfile(store / "digits.mar", twin / "evil.mar")
    target = LocalTarget(server_options(tmp_path / "run", store))
    state, _ = target.up()
    try:
        rendered = (Path(state.run_dir) / "config.properties").read_text()
        assert "store\\\\.d/[^/]+\\\\.mar" in rendered  # `\\.` in the file is `\.` for Java
        status, body = direct(state, "POST", f"/models?url=file://{twin}/evil.mar&model_name=evil")
        assert status == 404 and b"does not match any allowed URL" in body, body
        assert not (store / "evil.mar").exists()
    finally:
        target.down()


@pytest.mark.parametrize("text, expected", [
    ("a=b", {"a": "b"}),
    ("allowed_urls=file:///s/[^/]+\\\\.mar", {"allowed_urls": "file:///s/[^/]+\\.mar"}),
    ("allowed_urls=file:///s/[^/]+\\.mar", {"allowed_urls": "file:///s/[^/]+.mar"}),  # Java drops it
    ("key : value", {"key": "value"}),
    ("key value", {"key": "value"}),
    ("# comment\n! another\n  x=1", {"x": "1"}),
    ("long=a\\\n    b", {"long": "ab"}),
    ("u=\\u00e9\\t", {"u": "\u00e9\t"}),
])
def test_properties_are_read_as_java_reads_them(text, expected):
    assert pod.parse_properties(text) == expected


def test_properties_written_by_servetool_read_back_unchanged():
    values = {"allowed_urls": "file:///a\\.b/[^/]+\\.mar", "vmargs": " -Xss1m", "x:y": "a=b#c",
              "models": json.dumps({"m": {"1.0": {"marName": "m.mar"}}})}
    text = process.format_properties(values, "header")
    assert pod.parse_properties(text) == values


def test_front_target_parsing_matches_what_torchserve_decodes():
    """(tests/test_front_target.py holds the differential test against TorchServe's own parser.)"""
    checked = pod.canonical_target("/%6Dodels?url=a+b&x=%3F")
    assert checked.segments == ["", "models"] and checked.params == {"url": "a b", "x": "?"}
    assert checked.rebuilt == "/models?url=a%20b&x=%3F"
    with pytest.raises(ValueError, match="';'"):
        pod.canonical_target("/models?a=1;url=/x")


def test_status_shows_a_model_another_client_registered_under_an_odd_name(served):
    """Names servetool refuses can still exist (registered straight on TorchServe's socket by the
    server's user); status lists them instead of failing, and its URLs are encoded."""
    state = served[0].running()
    odd = "odd name?#"
    status, body = direct(state, "POST", f"/models?url=digits.mar&initial_workers=0&model_name="
                                         f"{quote(odd, safe='')}")
    assert status == 200, body
    try:
        shown = served[0].status()
        entry = [m for m in shown["models"] if m["name"] == odd]
        assert entry and entry[0]["version"] == "1.0" and entry[0]["workers"] == []
        assert any(m["name"] == "digits" for m in shown["models"])
    finally:
        direct(state, "DELETE", f"/models/{quote(odd, safe='')}")
