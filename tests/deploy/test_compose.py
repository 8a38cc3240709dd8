"""docker/docker-compose.yml: valid Compose (the specification's JSON schema, vendored in
tests/data; `docker compose config` / `docker-compose config` too where one is installed), the
settings the 4090 box needs, and a serve command that vLLM's own `vllm serve` argument parser
accepts with the meaning we intend (the plugin registered, as in the image).

No Docker engine can run here: the image is never built nor started by these tests.
tests/examples/test_examples.py starts the same command (GPU memory flags aside) on the CPU.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.compose import (
    COMPOSE_FILE,
    ENV_EXAMPLE,
    TEST_API_KEY,
    InterpolationError,
    interpolate,
    load_compose,
    read_env_file,
    serve_command,
    user_env,
)
from tests.helpers.paths import DOCKER

SCHEMA = Path(__file__).with_name("data") / "compose-spec.json"


def _validator():
    import jsonschema

    return jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))


def test_compose_file_matches_the_compose_specification_schema():
    validator = _validator()
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    for what, doc in (("as written", raw), ("with .env.example's values and a key", load_compose())):
        errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(doc)]
        assert not errors, f"docker-compose.yml {what} breaks the Compose schema:\n" + "\n".join(errors)
    # the schema does catch mistakes (it is not vacuous)
    broken = load_compose()
    broken["services"]["splitq"]["healthcheck"]["intervall"] = "30s"
    broken["services"]["splitq"]["ports"] = {"http": 8000}
    paths = sorted(e.json_path for e in validator.iter_errors(broken))
    assert paths == ["$.services.splitq.healthcheck", "$.services.splitq.ports"], paths


def test_env_example_defines_every_variable_the_compose_file_uses():
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", COMPOSE_FILE.read_text()))
    env = read_env_file(ENV_EXAMPLE)
    assert used <= set(env), f"not in .env.example: {sorted(used - set(env))}"
    assert "VLLM_API_KEY" in env  # vLLM reads the key from its environment (env_file: .env)
    # and nothing breaks when a variable is left out: every one but the key has a default in the file
    defaults = interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), {"VLLM_API_KEY": TEST_API_KEY})
    assert serve_command(defaults) == serve_command(load_compose())


def _entrypoint(key: str | None) -> subprocess.CompletedProcess:
    """The image's entry point script with this VLLM_API_KEY, starting a stand-in command."""
    env = {"PATH": "/usr/bin:/bin", **({} if key is None else {"VLLM_API_KEY": key})}
    cmd = ["sh", str(DOCKER / "entrypoint.sh"), "sh", "-c", "echo serving with $VLLM_API_KEY"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True)


@pytest.mark.parametrize("key", [None, "", "change-me"], ids=["unset", "empty", "placeholder"])
def test_no_real_api_key_no_server(key):
    """An empty or unset key stops compose before anything starts (vLLM would authenticate
    nothing); the placeholder passes compose's interpolation, so the image's entry point (the
    script itself, run here) refuses it, and any empty one that reaches it."""
    assert read_env_file(ENV_EXAMPLE)["VLLM_API_KEY"] == ""  # as shipped: refused until a key is pasted
    env = {k: v for k, v in user_env().items() if k != "VLLM_API_KEY"}
    if key is not None:
        env["VLLM_API_KEY"] = key
    if key == "change-me":
        assert load_compose(env)["services"]["splitq"]["environment"]["VLLM_API_KEY"] == key
    else:
        with pytest.raises(InterpolationError, match=r"VLLM_API_KEY.*set it in docker/.env to a secret"):
            load_compose(env)
    for k in (key, " CHANGE-ME ", " \t"):
        proc = _entrypoint(k)
        assert proc.returncode == 64 and proc.stdout == "", (k, proc)
        assert "splitq: VLLM_API_KEY is" in proc.stderr and "secrets.token_urlsafe(32)" in proc.stderr
    proc = _entrypoint(TEST_API_KEY)
    assert proc.returncode == 0 and proc.stdout == f"serving with {TEST_API_KEY}\n", proc


def test_compose_serving_service_settings():
    c = load_compose()
    svc = c["services"]["splitq"]
    env = read_env_file(ENV_EXAMPLE)
    # one NVIDIA GPU reserved
    (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == 1 and device["capabilities"] == ["gpu"]
    # the checkpoints folder mounted read-only; the served model is inside it
    mounts = {v["target"]: v for v in svc["volumes"]}
    assert mounts["/checkpoints"]["type"] == "bind" and mounts["/checkpoints"]["read_only"] is True
    assert mounts["/checkpoints"]["source"] == env["CHECKPOINTS_DIR"]
    cmd = serve_command(c)
    assert cmd[0] == f"/checkpoints/{env['CHECKPOINT_NAME']}"
    # API key from the env file, never on the command line (it would show in `ps` and `docker inspect` args)
    assert svc["env_file"] == ".env" and not any("api-key" in a or "api_key" in a for a in cmd)
    assert svc["environment"]["VLLM_API_KEY"] == TEST_API_KEY
    # port: host (loopback by default) -> the container's 8000, which the server listens on and the check probes
    assert svc["ports"] == [f"{env['BIND_ADDRESS']}:{env['HOST_PORT']}:8000"]
    port = cmd[cmd.index("--port") + 1]
    assert port == "8000" and f"127.0.0.1:{port}/health" in " ".join(svc["healthcheck"]["test"])
    assert svc["healthcheck"]["test"][0] == "CMD" and svc["restart"] == "unless-stopped"
    assert svc["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
    # the caches survive restarts (torch.compile, Triton)
    assert mounts["/home/vllm/.cache"]["type"] == "volume" and "cache" in c["volumes"]


def test_compose_calibration_service_runs_once_under_a_profile():
    c = load_compose()
    cal = c["services"]["calibrate"]
    assert cal["profiles"] == ["calibrate"] and cal["restart"] == "no" and cal["entrypoint"] == ["splitq-calibrate"]
    mounts = {v["target"]: v for v in cal["volumes"]}
    assert mounts["/hf-model"]["read_only"] and mounts["/calib-data"]["read_only"]
    assert not mounts["/checkpoints"].get("read_only", False)
    assert mounts["/checkpoints"]["source"] == c["services"]["splitq"]["volumes"][0]["source"]
    # it writes the checkpoint the serving service serves
    cmd = [str(a) for a in cal["command"]]
    assert cmd[cmd.index("--output") + 1] == serve_command(c)[0]


def test_calibration_command_is_accepted_by_splitq_calibrate(capsys):
    """`--dump-recipe` parses every flag and prints the effective settings, without running."""
    from splitq_calibration.cli import calibrate_main

    cmd = [str(a) for a in load_compose()["services"]["calibrate"]["command"]]
    assert calibrate_main([*cmd, "--dump-recipe"]) == 0
    recipe = yaml.safe_load(capsys.readouterr().out)
    settings = recipe.get("splitq", recipe)
    assert settings["scheme"] == user_env()["SCHEME"] and settings["device"] == "cuda"
    assert settings["image_dir"] == "/calib-data"


def _parse_serve(argv: list[str]):
    """argv through the parser of `vllm serve` (the image's entry point), as ServeSubcommand does."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))  # loads the general plugins first
    args = parser.parse_args(argv)
    validate_parsed_serve_args(args)
    if args.model_tag is not None:
        args.model = args.model_tag
    return args


def test_serve_command_parses_with_vllms_own_parser():
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    from splitq_vllm.plugin.config import SplitQVllmConfig

    cmd = serve_command()
    env = read_env_file(ENV_EXAMPLE)
    args = _parse_serve(cmd)
    assert args.model == f"/checkpoints/{env['CHECKPOINT_NAME']}"
    assert args.quantization == "splitq"
    # the plugin (an installed entry point) registered the method the flag names
    assert "splitq" in QUANTIZATION_METHODS and get_quantization_config("splitq") is SplitQVllmConfig
    assert args.served_model_name == [env["SERVED_MODEL_NAME"]]
    assert args.max_model_len == 16384 and args.gpu_memory_utilization == pytest.approx(0.90)
    assert args.max_num_seqs == 16 and (args.host, args.port) == ("0.0.0.0", 8000)
    assert args.limit_mm_per_prompt == {"image": 4, "video": 0}
    assert args.mm_processor_kwargs == {"max_pixels": 1280 * 28 * 28}  # 1280 vision tokens of 28 x 28 pixels
    assert args.api_key is None  # from VLLM_API_KEY in the environment instead
    engine = AsyncEngineArgs.from_cli_args(args)
    assert (engine.model, engine.quantization, engine.max_model_len) == (args.model, "splitq", 16384)
    # the parser is strict: a misspelt flag would not pass
    with pytest.raises(SystemExit):
        _parse_serve([*cmd, "--quantisation", "splitq"])


def _compose_binary() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


def test_docker_compose_config_accepts_the_file(tmp_path):
    binary = _compose_binary()
    if binary is None:
        pytest.skip("neither docker-compose nor the docker compose plugin is installed (the schema test above "
                    "covers the file; Debian's docker-compose package adds this check)")  # fmt: skip
    work = tmp_path / "docker"
    work.mkdir()
    shutil.copy(COMPOSE_FILE, work / "docker-compose.yml")
    shutil.copy(ENV_EXAMPLE, work / ".env")
    proc = subprocess.run([*binary, "--profile", "calibrate", "config"], cwd=work, capture_output=True, text=True)
    assert proc.returncode != 0 and "VLLM_API_KEY" in proc.stdout + proc.stderr  # the key left empty
    (work / ".env").write_text("".join(f"{k}={v}\n" for k, v in user_env().items()))
    proc = subprocess.run([*binary, "--profile", "calibrate", "config"], cwd=work, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    assert [str(a) for a in resolved["services"]["splitq"]["command"]] == serve_command()


def test_two_gpu_service_splits_the_model_with_tensor_parallelism():
    """The 2 x RTX 4090 service (profile tp2): two GPUs reserved, --tensor-parallel-size 2, the
    rest of the one-GPU service's settings, a command vLLM's parser accepts."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    c = load_compose()
    svc, one = c["services"]["splitq-tp2"], c["services"]["splitq"]
    assert svc["profiles"] == ["tp2"]
    assert svc["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 2
    cmd = [str(a) for a in svc["command"]]
    env = read_env_file(ENV_EXAMPLE)
    args = _parse_serve(cmd)
    assert args.model == f"/checkpoints/{env['TP2_CHECKPOINT_NAME']}" and args.quantization == "splitq"
    assert args.tensor_parallel_size == 2
    engine = AsyncEngineArgs.from_cli_args(args)
    assert engine.tensor_parallel_size == 2
    single = _parse_serve(serve_command())
    for flag in ("max_model_len", "gpu_memory_utilization", "max_num_seqs", "limit_mm_per_prompt", "mm_processor_kwargs"):
        assert getattr(args, flag) == getattr(single, flag), flag
    assert svc["environment"]["VLLM_API_KEY"] == one["environment"]["VLLM_API_KEY"]
    assert svc["volumes"] == one["volumes"] and svc["ports"] != one["ports"]
