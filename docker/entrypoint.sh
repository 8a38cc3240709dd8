#!/bin/sh
# The image's entry point: refuse to serve without a real API key, then run the command
# (`vllm serve ...`, the Dockerfile's ENTRYPOINT arguments plus the compose command).
#
# vLLM reads the key from VLLM_API_KEY, and an empty one turns authentication off altogether
# (every /v1 request is answered); `change-me` is the placeholder older copies of .env.example
# shipped. Both are refused here, before the model loads (to serve without a key on purpose, run
# the image with `--entrypoint vllm` and `serve ...`).
set -eu

case $(printf '%s' "${VLLM_API_KEY-}" | tr -d '[:space:]' | tr '[:upper:]' '[:lower:]') in
    "") problem="is empty or unset, which would serve every request without a key" ;;
    change-me | changeme) problem="is still the placeholder 'change-me' of .env.example" ;;
    *) exec "$@" ;;
esac
echo "splitq: VLLM_API_KEY $problem. Set it in docker/.env to a secret, e.g. the output of" >&2
echo "splitq:   python3 -c \"import secrets; print(secrets.token_urlsafe(32))\"" >&2
exit 64
