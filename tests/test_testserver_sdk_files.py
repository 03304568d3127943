"""Files and the model repository of the real `lmstudio` 1.5 SDK against lmflow's LM Studio test server.

`client.files` (`prepare_image`, `_prepare_file`), file handles in chats, and `client.repository`
(search, download options, download), as LM Studio answers them (the test server's modules
sdk_files.py and sdk_repository.py say what is read and what inferred).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import httpx
import lmstudio as lms
import pytest
from conftest import wait_for
from httpx_ws import connect_ws
from test_testserver_sdk import publisher_models_folder

from lmflow.testing.pytest_plugin import RunningServer

pytestmark = [pytest.mark.engine, pytest.mark.slow]

KEY = "smollm2-135m-instruct"
#: the PNG signature and a little more: the bytes that make a file an image, whatever its name
PNG = bytes.fromhex("89504e470d0a1a0a") + bytes(24)


@pytest.fixture
def client(lmstudio: str):
    with lms.Client(lmstudio.removeprefix("http://")) as client:
        yield client
        for model in client.llm.list_loaded():
            model.unload()


def _rpc(ws, call_id: int, endpoint: str, parameter: dict) -> dict:
    ws.send_json({"type": "rpcCall", "endpoint": endpoint, "callId": call_id, "parameter": parameter})
    return ws.receive_json(timeout=10)


def test_prepared_files_get_handles_with_their_type_and_size(client: lms.Client) -> None:
    image = client.files.prepare_image(PNG, "figure.png")
    text = client.files._prepare_file(b"raw data", "notes.txt")
    assert (image.name, image.file_type, image.size_bytes) == ("figure.png", "image", len(PNG))
    assert (text.name, text.file_type, text.size_bytes) == ("notes.txt", "text/plain", 8)
    # every upload is a file of its own, even of the same bytes; an identifier is a file name
    assert len({image.identifier, text.identifier, client.files.prepare_image(PNG).identifier}) == 3
    assert "/" not in image.identifier and image.identifier.endswith(".png")
    # an image is told by its bytes, not its name; other text is text/other; the rest unknown
    assert client.files._prepare_file(PNG, "figure.txt").file_type == "image"
    assert client.files._prepare_file(b"print(1)\n", "script.py").file_type == "text/other"
    assert client.files._prepare_file(b"\x00\xff\xfe", "data.bin").file_type == "unknown"


def test_a_clients_files_are_kept_until_it_disconnects(lmstudio: str) -> None:
    with httpx.Client() as http, connect_ws(f"{lmstudio.replace('http', 'ws', 1)}/files", http) as ws:
        ws.send_json({"authVersion": 1, "clientIdentifier": "raw", "clientPasskey": "raw"})
        assert ws.receive_json(timeout=5) == {"success": True}
        uploaded = _rpc(ws, 1, "uploadFileBase64", {"name": "notes.txt",
                                                    "contentBase64": base64.b64encode(b"hello").decode()})
        assert uploaded["result"]["fileType"] == "text/plain"
        answer = _rpc(ws, 2, "getLocalFileAbsolutePath", {"fileName": uploaded["result"]["identifier"]})
        path = Path(answer["result"]["path"])
        assert path.read_bytes() == b"hello"
        refused = _rpc(ws, 3, "uploadFileBase64", {"name": "x.txt", "contentBase64": "not base64!"})
        assert refused["error"]["title"] == "uploadFileBase64: the content of 'x.txt' is not valid base64"
        unknown = _rpc(ws, 4, "getLocalFileAbsolutePath", {"fileName": "no-such-file.txt"})
        assert unknown["error"]["title"].startswith("No file 'no-such-file.txt' in the user files")
    assert wait_for(lambda: not path.exists())


def test_an_image_is_refused_and_a_text_file_left_out_of_the_prompt(client: lms.Client) -> None:
    smol = client.llm.load_new_instance(KEY, "sdk-files", config={"contextLength": 1024})
    image = client.files.prepare_image(PNG, "figure.png")
    chat = lms.Chat()
    chat.add_user_message("What color is this figure?", images=[image])
    with pytest.raises(lms.LMStudioServerError, match="'sdk-files' cannot read images: it is not a vision"):
        smol.respond(chat)
    notes = client.files._prepare_file(b"The secret is 42.", "notes.txt")
    with_file, plain = lms.Chat("Be brief."), lms.Chat("Be brief.")
    with_file.add_user_message("What is the secret?", _files=[notes])
    plain.add_user_message("What is the secret?")
    assert smol.apply_prompt_template(with_file) == smol.apply_prompt_template(plain)
    result = smol.respond(with_file, config={"maxTokens": 3, "temperature": 0})
    assert result.stats.predicted_tokens_count == 3
    assert result.stats.prompt_tokens_count == smol.count_tokens(smol.apply_prompt_template(plain))


def test_the_repository_is_the_models_the_server_has(
        lmstudio_server_factory: Callable[..., RunningServer], tmp_path: Path) -> None:
    folder = publisher_models_folder(tmp_path)
    size = next(folder.rglob("SmolLM2*.gguf")).stat().st_size
    server = lmstudio_server_factory(models=[], models_dir=str(folder))
    with lms.Client(server.host) as client:
        found = client.repository.search_models("SmolLM2-135M")
        assert [(m.search_result.name, m.search_result.exact) for m in found] == [
            ("lmstudio-community/SmolLM2-135M-Instruct-GGUF", False)]
        assert client.repository.search_models(KEY)[0].search_result.exact  # a model's key
        assert client.repository.search_models("no-such-model") == []
        assert [m.search_result.name for m in client.repository.search_models(limit=1)] == [
            "hugging-quants/Llama-3.2-1B-Instruct-Q8_0-GGUF"]
        options = found[0].get_download_options()
        listed = [(o.info.name, o.info.quantization, o.info.size_bytes, o.info.recommended) for o in options]
        assert listed == [("SmolLM2-135M-Instruct-Q4_1.gguf", "Q4_1", size, True)]
        progress: list[lms.DownloadProgressUpdate] = []
        finalized: list[bool] = []
        # here already: the download ends at once, with the key that loads it
        assert options[0].download(on_progress=progress.append,
                                   on_finalize=lambda: finalized.append(True)) == KEY
        assert [(p.downloaded_bytes, p.total_bytes) for p in progress] == [(size,) * 2]
        assert finalized == [True]
        assert KEY in {m.model_key for m in client.llm.list_downloaded()}
    url = server.url.replace("http", "ws", 1)
    with httpx.Client() as http, connect_ws(f"{url}/repository", http) as ws:
        ws.send_json({"authVersion": 1, "clientIdentifier": "raw", "clientPasskey": "raw"})
        assert ws.receive_json(timeout=5) == {"success": True}
        ws.send_json({"type": "channelCreate", "endpoint": "downloadModel", "channelId": 1,
                      "creationParameter": {"downloadIdentifier": "someone/else/model.gguf"}})
        error = ws.receive_json(timeout=5)
        assert error["type"] == "channelError"
        assert error["error"]["title"].startswith("Cannot download 'someone/else/model.gguf': the lmflow "
                                                  "test server downloads nothing from the network")
        assert _rpc(ws, 2, "getModelDownloadOptions", {"modelSearchResultIdentifier": {
            "type": "hf", "identifier": "someone/else"}})["error"]["title"].startswith(
            "No model 'someone/else' in the repository")
