"""`adaclip serve`: a real uvicorn on 127.0.0.1 (ephemeral port) in a thread of this process, the batcher
on its own, and the command in a subprocess for start-up checks and the SIGHUP reload."""

from __future__ import annotations

import base64
import io
import re
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

import adaclip
from adaclip.cli import main
from adaclip.serve import AdapterSet, ServeSettings, Service, create_app, load_adapter_set, parse_adapter_specs
from adaclip.serve.batching import Batcher, HeadRequest, Job, QueueFull
from adaclip.serve.inputs import Upload
from adaclip.serve.metrics import ServeMetrics

from .cli_run import start_cli

TOKEN = "serve-test-token-0123456789"
FROZEN = ("zs", "probe", "tip", "coop", "rada")  # methods whose image tower is frozen
RECIPES = {
    "zs": ("zeroshot", {}),
    "probe": ("linear-probe", {"epochs": 2, "lr": 1e-2}),
    "tip": ("tip-adapter", {}),
    "coop": ("coop", {"epochs": 1, "n_ctx": 4}),
    "rada": ("rada", {"epochs": 1}),
    "lora": ("lora", {"epochs": 1}),  # adapts the image tower: answered from its own encoding
}


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def adapter_files(dataset, tiny_backbone, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("served")
    files = {}
    for name, (method, settings) in RECIPES.items():
        adapter = adaclip.fit(dataset, method, backbone=tiny_backbone, seed=0, val_split=0, **settings)
        files[name] = adapter.save(root / f"{name}.adaclip")
    return files


@pytest.fixture(scope="module")
def adapter_set(adapter_files, tiny_backbone) -> AdapterSet:
    specs = parse_adapter_specs([str(path) for path in adapter_files.values()])
    return load_adapter_set(specs, backbones=[tiny_backbone])


@pytest.fixture(scope="module")
def test_images(dataset) -> list[Path]:
    return sorted((dataset / "test").rglob("*.png"))[::6][:4]  # one of each class


@contextmanager
def running(app):
    """uvicorn on 127.0.0.1, an ephemeral port, in a thread; yields the base URL."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


SETTINGS = ServeSettings(max_upload_mb=0.5, max_images=4, max_pixels=1_000_000, max_classes=8, queue_size=8)


@pytest.fixture(scope="module")
def server(adapter_set):
    service = Service(adapter_set, SETTINGS)
    with running(create_app(service)) as url, httpx.Client(base_url=url, timeout=30) as client:
        client.service = service
        yield client


def png_bytes(path: Path) -> bytes:
    return path.read_bytes()


def files_of(paths: list[Path]) -> list:
    return [("image", (p.name, png_bytes(p), "image/png")) for p in paths]


def own_predict(adapter_set, name, paths, top_k, classes=None):
    adapter = adapter_set.get(name).adapter
    with adapter.classes(classes):
        predictions = adapter.predict(paths, top_k=top_k)
    records = []
    for prediction, path in zip(predictions, paths, strict=True):
        prediction.path = path.name
        records.append(prediction.to_dict())
    return records


def metric(client, name: str, **labels) -> float:
    text = client.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def truncated_png(path: Path) -> bytes:
    data = png_bytes(path)
    return data[: len(data) // 2]


def bomb_png() -> bytes:
    """2000 x 2000 = 4 MP of one colour: a few kB on the wire, over the test server's 1 MP limit."""
    buffer = io.BytesIO()
    Image.new("L", (2000, 2000)).save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------ endpoints


def test_health_ready_and_adapter_list(server, adapter_files, adapter_set):
    assert server.get("/healthz").json() == {"status": "ok"}
    ready = server.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    listing = server.get("/v1/adapters").json()
    by_name = {a["name"]: a for a in listing["adapters"]}
    assert set(by_name) == set(RECIPES)
    for name, path in adapter_files.items():
        header = adaclip.adapter_file.read_adapter_header(path).model_dump(mode="json")
        entry = by_name[name]
        assert entry["method"] == header["method"] and entry["class_names"] == header["class_names"]
        assert entry["tensors_sha256"] == header["tensors_sha256"] and entry["file_bytes"] == path.stat().st_size
        assert entry["frozen_image_tower"] == (name in FROZEN)
        assert entry["backbone_copy"] == 0  # all six share one backbone
    assert len(adapter_set.backbones) == 1
    assert str(adapter_files["zs"].parent) not in server.get("/v1/adapters").text  # no server paths leak


@pytest.mark.parametrize("name", list(RECIPES))
def test_classify_multipart_equals_predict(server, adapter_set, test_images, name):
    response = server.post("/v1/classify", params={"adapter": name, "top_k": 3}, files=files_of(test_images))
    assert response.status_code == 200, response.text
    document = response.json()
    assert document["adapter"] == name and document["method"] == RECIPES[name][0]
    assert document["predictions"] == own_predict(adapter_set, name, test_images, 3)


def test_classify_json_base64_and_raw_body_equal_multipart(server, adapter_set, test_images):
    images = [{"name": p.name, "data": base64.b64encode(png_bytes(p)).decode()} for p in test_images[:3]]
    response = server.post("/v1/classify", json={"adapter": "probe", "top_k": 2, "images": images})
    assert response.status_code == 200, response.text
    assert response.json()["predictions"] == own_predict(adapter_set, "probe", test_images[:3], 2)
    raw = server.post(
        "/v1/classify?adapter=probe&top_k=2", content=png_bytes(test_images[0]), headers={"Content-Type": "image/png"}
    )
    expected = own_predict(adapter_set, "probe", test_images[:1], 2)[0]
    assert raw.json()["predictions"] == [{**expected, "path": "image"}]


def test_adapter_all_equals_each_adapters_predict_from_one_encoding(server, adapter_set, test_images):
    encoded_before = metric(server, "adaclip_images_encoded_total")
    response = server.post("/v1/classify", params={"adapter": "all", "top_k": 4}, files=files_of(test_images))
    assert response.status_code == 200, response.text
    document = response.json()
    assert [r["adapter"] for r in document["results"]] == list(FROZEN)
    assert document["not_included"] == ["lora"]
    for result in document["results"]:
        assert result["predictions"] == own_predict(adapter_set, result["adapter"], test_images, 4), result["adapter"]
    # five frozen-tower adapters answered, but each image went through the image tower once
    assert metric(server, "adaclip_images_encoded_total") - encoded_before == len(test_images)


def test_classes_for_a_class_agnostic_adapter(server, adapter_set, test_images):
    names = ["red thing", "green thing", "blue thing"]
    response = server.post(
        "/v1/classify",
        params={"adapter": "zs", "top_k": 2},
        files=[*files_of(test_images[:2]), ("classes", (None, "\n".join(names)))],
    )
    assert response.status_code == 200, response.text
    assert response.json()["predictions"] == own_predict(adapter_set, "zs", test_images[:2], 2, classes=names)
    again = server.post("/v1/classify", params={"adapter": "zs", "top_k": 2}, files=files_of(test_images[:2]))
    assert again.json()["predictions"] == own_predict(adapter_set, "zs", test_images[:2], 2)  # own classes restored


def test_one_bad_image_fails_only_its_entry(server, adapter_set, test_images):
    files = files_of(test_images[:2])
    files.insert(1, ("image", ("broken.png", truncated_png(test_images[2]), "image/png")))
    files.append(("image", ("notes.txt", b"not an image at all", "text/plain")))
    response = server.post("/v1/classify", params={"adapter": "rada"}, files=files)
    assert response.status_code == 200
    records = response.json()["predictions"]
    assert [r["path"] for r in records] == [test_images[0].name, "broken.png", test_images[1].name, "notes.txt"]
    assert (
        records[1]["error"] and records[1]["label"] is None and records[3]["error"] == "not a recognised image format"
    )
    assert [records[0], records[2]] == own_predict(adapter_set, "rada", test_images[:2], 5)


def post_one(server, name: str, data: bytes, **params):
    return server.post("/v1/classify", params={"adapter": "zs", **params}, files=[("image", (name, data, "image/png"))])


def test_bad_inputs_get_their_4xx(server, test_images):
    good = png_bytes(test_images[0])
    cases = {
        "non-image": (post_one(server, "a.txt", b"hello, not a picture"), 415),
        "truncated": (post_one(server, "t.png", truncated_png(test_images[0])), 422),
        "bomb": (post_one(server, "bomb.png", bomb_png()), 413),
        "over upload limit": (post_one(server, "big.png", good + b"\0" * 600_000), 413),
        "unknown adapter": (post_one(server, "a.png", good, adapter="nope"), 404),
        "path as adapter": (post_one(server, "a.png", good, adapter="../../etc/passwd"), 404),
        "too many images": (server.post("/v1/classify?adapter=zs", files=files_of(test_images[:1] * 5)), 413),
        "top_k zero": (post_one(server, "a.png", good, top_k=0), 422),
        "top_k text": (post_one(server, "a.png", good, top_k="many"), 422),
        "unknown parameter": (post_one(server, "a.png", good, topk=3), 422),
        "classes for a class-bound adapter": (
            server.post("/v1/classify?adapter=probe", files=[*files_of(test_images[:1]), ("classes", (None, "a\nb"))]),
            422,
        ),
        "classes with all": (
            server.post("/v1/classify?adapter=all", files=[*files_of(test_images[:1]), ("classes", (None, "a\nb"))]),
            422,
        ),
        "too many classes": (
            server.post(
                "/v1/classify?adapter=zs",
                json={"images": [base64.b64encode(good).decode()], "classes": list("abcdefghij")},
            ),
            422,
        ),
        "no adapter with several loaded": (server.post("/v1/classify", files=files_of(test_images[:1])), 422),
        "no image": (server.post("/v1/classify?adapter=zs", json={"images": []}), 422),
        "malformed JSON": (
            server.post("/v1/classify?adapter=zs", content=b"{nope", headers={"Content-Type": "application/json"}),
            400,
        ),
        "bad base64": (server.post("/v1/classify?adapter=zs", json={"images": ["@@not base64@@"]}), 422),
        "JSON not an object": (server.post("/v1/classify?adapter=zs", json=["x"]), 422),
        "wrong content type": (
            server.post("/v1/classify?adapter=zs", content=b"x", headers={"Content-Type": "text/plain"}),
            415,
        ),
        "GET on classify": (server.get("/v1/classify"), 405),
        "unknown route": (server.get("/v1/adapters/zs"), 404),
    }
    for case, (response, status) in cases.items():
        assert response.status_code == status, f"{case}: {response.status_code} {response.text[:200]}"
        assert response.json()["error"], case  # always a JSON error message, never a crash page
    # a streamed body without Content-Length is cut at the limit too
    chunks = iter([b"\0" * 300_000, b"\0" * 300_000])
    streamed = server.post("/v1/classify?adapter=zs", content=chunks, headers={"Content-Type": "image/png"})
    assert streamed.status_code == 413
    assert server.get("/healthz").status_code == 200  # and the server is still up


def test_full_queue_answers_503_with_retry_after_and_recovers(server, adapter_set, test_images):
    service = server.service
    files = files_of(test_images[:4])
    results = {}
    with httpx.Client(base_url=str(server.base_url), timeout=30) as other:

        def send(index: int) -> None:
            results[index] = other.post("/v1/classify?adapter=zs", files=files)

        waiting = [threading.Thread(target=send, args=(i,)) for i in range(2)]
        with service.batcher.hold():  # the worker takes no batch: admitted images stay in the queue
            for thread in waiting:
                thread.start()
            deadline = time.monotonic() + 20
            while not service.batcher.full and time.monotonic() < deadline:
                time.sleep(0.01)
            assert service.batcher.full  # 8 of 8 images admitted
            rejected = server.post("/v1/classify?adapter=zs", files=files_of(test_images[:1]))
            assert rejected.status_code == 503 and int(rejected.headers["Retry-After"]) >= 1
            assert server.get("/readyz").status_code == 503
        for thread in waiting:
            thread.join(30)
    assert [results[i].status_code for i in range(2)] == [200, 200]
    assert results[0].json()["predictions"] == own_predict(adapter_set, "zs", test_images[:4], 5)
    assert server.get("/readyz").status_code == 200
    assert metric(server, "adaclip_rejected_total") >= 1


def test_metrics_are_prometheus_text(server, test_images):
    server.post("/v1/classify?adapter=tip", files=files_of(test_images[:2]))
    families = {f.name: f for f in text_string_to_metric_families(server.get("/metrics").text)}
    for name in ("adaclip_requests", "adaclip_request_seconds", "adaclip_batch_images", "adaclip_queue_images"):
        assert name in families, name
    assert metric(server, "adaclip_requests_total", route="/v1/classify", status="200") >= 1
    assert metric(server, "adaclip_predictions_total", adapter="tip") >= 2
    assert metric(server, "adaclip_adapters_loaded") == len(RECIPES)
    assert metric(server, "adaclip_backbone_copies") == 1


def test_bearer_token(adapter_set, test_images):
    service = Service(adapter_set, SETTINGS)
    with running(create_app(service, token=TOKEN)) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/healthz").status_code == 200  # probes need no token
        assert client.get("/v1/adapters").status_code == 401
        wrong = client.get("/v1/adapters", headers={"Authorization": "Bearer not-the-token"})
        assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"] == "Bearer"
        assert client.get("/metrics").status_code == 401
        good = {"Authorization": f"Bearer {TOKEN}"}
        assert client.get("/v1/adapters", headers=good).status_code == 200
        answer = client.post("/v1/classify?adapter=zs", files=files_of(test_images[:1]), headers=good)
        assert answer.status_code == 200


# ------------------------------------------------------------------------------------------ batcher


def test_waiting_requests_are_encoded_as_one_batch_with_the_same_answers(adapter_set, test_images):
    """Jobs queued while the worker is held go through the tower together (one batch of 5 images),
    and every job gets the answers its adapter alone would give."""
    import asyncio

    metrics = ServeMetrics()
    batcher = Batcher(max_batch=32, wait_s=0.0, capacity=64, metrics=metrics)
    zs, probe = adapter_set.get("zs"), adapter_set.get("probe")
    uploads = [Upload(p.name, p.read_bytes()) for p in test_images]

    async def scenario():
        loop = asyncio.get_running_loop()
        jobs = []
        with batcher.hold():
            batcher.start()
            for index, upload in enumerate(uploads):
                head = HeadRequest(zs if index % 2 else probe, None, 2)
                job = Job(zs.encoder_key, zs, [upload], [head], loop.create_future(), loop)
                batcher.reserve(1)
                batcher.submit(job)
                jobs.append(job)
        return await asyncio.gather(*(job.future for job in jobs))

    try:
        answers = asyncio.run(scenario())
    finally:
        batcher.stop()
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    counts = {
        s.labels.get("le"): s.value for s in families["adaclip_batch_images"].samples if s.name.endswith("_bucket")
    }
    assert counts["2.0"] == 0 and counts["4.0"] == 1  # one batch, of four images
    for index, answer in enumerate(answers):
        served = zs if index % 2 else probe
        expected = served.adapter.predict([test_images[index]], top_k=2)[0]
        got = answer.predictions[0][0]
        assert got.label == expected.label
        assert [label for label, _ in got.top_k] == [label for label, _ in expected.top_k]
        assert [s for _, s in got.top_k] == pytest.approx([s for _, s in expected.top_k], abs=1e-5)


def test_reserve_refuses_past_capacity():
    batcher = Batcher(max_batch=4, wait_s=0.0, capacity=5, metrics=ServeMetrics())
    batcher.reserve(4)
    with pytest.raises(QueueFull):
        batcher.reserve(2)
    batcher.release(4)
    batcher.reserve(5)


def test_adapters_of_a_local_checkpoint_are_served_from_one_copy(tiny_backbone, test_images, tmp_path, capsys):
    """Adapters trained on a local checkpoint load it from where they were trained (or --pretrained),
    sha256-checked; two copies of the same file at different paths are one backbone."""
    import shutil

    import torch

    from adaclip.backbone import create_backbone
    from adaclip.errors import AdapterFileError

    weights = {k: v + 0.01 for k, v in tiny_backbone.model.state_dict().items()}  # not the "none" weights
    first, second = tmp_path / "a" / "weights.pt", tmp_path / "b" / "weights.pt"
    first.parent.mkdir()
    second.parent.mkdir()
    torch.save(weights, first)
    shutil.copyfile(first, second)
    files = {}
    for name, checkpoint, classes in (("one", first, ["cat", "dog"]), ("two", second, ["car", "bus", "van"])):
        backbone = create_backbone(tiny_backbone.identity.name, str(checkpoint), device="cpu")
        files[name] = adaclip.zero_shot_adapter(classes, backbone=backbone).save(tmp_path / f"{name}.adaclip")
    specs = parse_adapter_specs([str(path) for path in files.values()])

    served = load_adapter_set(specs)  # from the recorded paths
    assert len(served.backbones) == 1 and served.get("one").adapter.backbone is served.get("two").adapter.backbone
    expected = adaclip.load(files["two"], pretrained=str(second)).predict(test_images, top_k=2)
    with running(create_app(Service(served, SETTINGS))) as url:
        answer = httpx.post(f"{url}/v1/classify", params={"adapter": "two", "top_k": 2}, files=files_of(test_images))
    assert answer.status_code == 200, answer.text
    for record, prediction in zip(answer.json()["predictions"], expected, strict=True):
        assert record == {**prediction.to_dict(), "path": record["path"]}

    moved = tmp_path / "moved.pt"
    first.rename(moved)
    with pytest.raises(AdapterFileError, match="pass pretrained="):  # before any backbone is built
        load_adapter_set(specs)
    assert len(load_adapter_set(specs, pretrained=str(moved)).backbones) == 1
    other = tmp_path / "other.pt"
    torch.save(tiny_backbone.model.state_dict(), other)
    with pytest.raises(AdapterFileError, match="checkpoint sha256"):
        load_adapter_set(specs, pretrained=str(other))
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", str(files["one"]), "--pretrained", str(tmp_path / "gone.pt")])
    assert exit_info.value.code == 2 and "checkpoint file not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ command


def test_serve_refuses_bad_input_before_loading(adapter_files, tmp_path, capsys):
    cases = [
        ([str(tmp_path / "missing.adaclip")], "adapter file not found"),
        ([str(adapter_files["zs"]), f"zs={adapter_files['probe']}"], "two adapters are named 'zs'"),
        ([f"all={adapter_files['zs']}"], "cannot serve an adapter named 'all'"),
        ([str(adapter_files["zs"]), "--token-file", str(tmp_path / "none.txt")], "token file not found"),
        ([str(adapter_files["zs"]), "--max-images", "500"], "--max-images"),
        ([str(adapter_files["zs"]), "--batch-wait-ms", "-1"], "--batch-wait-ms"),
    ]
    short = tmp_path / "short.txt"
    short.write_text("abc\n")
    cases.append(([str(adapter_files["zs"]), "--token-file", str(short)], "at least 16 characters"))
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["serve", *argv])
        assert exit_info.value.code == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)


@pytest.mark.slow
def test_serve_command_end_to_end_and_sighup_reload(adapter_files, dataset, tiny_backbone, tmp_path):
    """The real command in a subprocess: serves on a free port, reloads files on SIGHUP (keeping the old
    set when a file is broken), and stops cleanly on SIGTERM."""
    served = tmp_path / "model.adaclip"
    served.write_bytes(adapter_files["zs"].read_bytes())
    process = start_cli("serve", f"m={served}", "--port", "0", "--device", "cpu", stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline and process.poll() is None:
            found = [re.search(r"running on (http://127\.0\.0\.1:\d+)", line) for line in list(lines)]
            url = next((m.group(1) for m in found if m), None)
            time.sleep(0.1)
        assert url, "".join(lines)
        with httpx.Client(base_url=url, timeout=30) as client:
            assert (
                client.get("/v1/adapters").json()["adapters"][0]["class_names"]
                == adaclip.load(adapter_files["zs"], backbone=tiny_backbone).class_names
            )
            # a new file in place, then SIGHUP: the new adapter is served
            new_classes = ["cat", "dog", "fish"]
            adaclip.zero_shot_adapter(new_classes, backbone=tiny_backbone).save(served, force=True)
            process.send_signal(signal.SIGHUP)
            assert wait_for(lambda: client.get("/v1/adapters").json()["generation"] == 1)
            assert client.get("/v1/adapters").json()["adapters"][0]["class_names"] == new_classes
            image = sorted((dataset / "test").rglob("*.png"))[0]
            answer = client.post("/v1/classify", files=files_of([image])).json()
            assert answer["predictions"][0]["label"] in new_classes
            # a broken file on reload: the previous adapters stay
            served.write_bytes(b"broken")
            process.send_signal(signal.SIGHUP)
            assert wait_for(lambda: metric(client, "adaclip_reloads_total", result="error") == 1)
            assert client.get("/v1/adapters").json()["adapters"][0]["class_names"] == new_classes
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    reader.join(5)
    text = "".join(lines)
    assert "reload failed, still serving the previous adapters" in text and "Traceback" not in text


def test_asgi_factory_serves_what_the_command_would(
    adapter_files, adapter_set, test_images, tmp_path, monkeypatch, capsys
):
    """uvicorn --factory / gunicorn build the app from ADACLIP_SERVE_ARGS: the same options and checks
    as `adaclip serve`, the same answers; a bad option ends the worker with one line and exit code 2."""
    from adaclip.serve.asgi import ENV, create_from_env

    token_file = tmp_path / "token.txt"
    token_file.write_text(TOKEN + "\n")
    monkeypatch.setenv(ENV, f"probe={adapter_files['probe']} --token-file {token_file} --max-images 2 --port 9")
    app = create_from_env()
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/v1/adapters").status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        answer = client.post("/v1/classify?top_k=2", files=files_of(test_images[:2]), headers=auth)
        assert answer.status_code == 200, answer.text
        assert answer.json()["predictions"] == own_predict(adapter_set, "probe", test_images[:2], 2)
        too_many = client.post("/v1/classify", files=files_of(test_images[:3]), headers=auth)
        assert too_many.status_code == 413  # --max-images 2 reached the app
    for args, message in (
        (f"{adapter_files['probe']} --max-batch 0", "--max-batch"),
        (f"{adapter_files['probe']} --no-such-option", "No such option"),
        (str(tmp_path / "missing.adaclip"), "adapter file not found"),
    ):
        monkeypatch.setenv(ENV, args)
        with pytest.raises(SystemExit) as exit_info:
            create_from_env()
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and "Traceback" not in err, (args, err)


def wait_for(condition, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False
