#!/usr/bin/env bash
# The OpenAI chat API of a SplitQ model served by vLLM, with curl only.
#
#   examples/curl_chat.sh photo.jpg                                  # a local image
#   examples/curl_chat.sh photo.jpg https://example.com/cat.jpg      # + an image URL, streamed, + both at once
#
# Environment: BASE_URL (default http://localhost:8000/v1), VLLM_API_KEY (default EMPTY, for a
# server without a key), MODEL (default: the first model the server lists), MAX_TOKENS (default 128).
# Needs curl, base64, sed; prints the server's raw JSON (and SSE lines when streaming).
set -euo pipefail

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: $0 IMAGE_FILE [IMAGE_URL]" >&2
    exit 2
fi
IMAGE_FILE=$1
IMAGE_URL=${2:-}
BASE_URL=${BASE_URL:-http://localhost:8000/v1}
API_KEY=${VLLM_API_KEY:-EMPTY}
MAX_TOKENS=${MAX_TOKENS:-128}
[ -f "$IMAGE_FILE" ] || { echo "error: image file not found: $IMAGE_FILE" >&2; exit 2; }

# The model: the first entry of GET /v1/models unless MODEL is set.
if [ -z "${MODEL:-}" ]; then
    # (the first "id" of the listing is data[0].id: a model's own id precedes its permissions')
    MODEL=$(curl -sS --fail-with-body -H "Authorization: Bearer $API_KEY" "$BASE_URL/models" \
        | grep -o '"id"[[:space:]]*:[[:space:]]*"[^"]*"' | sed -n '1s/.*"\([^"]*\)"$/\1/p')
    [ -n "$MODEL" ] || { echo "error: could not read the model name from $BASE_URL/models" >&2; exit 1; }
fi
echo "# model: $MODEL"

# A local image travels inline as a base64 data URL.
case "$(printf '%s' "$IMAGE_FILE" | tr '[:upper:]' '[:lower:]')" in
    *.jpg | *.jpeg) MIME=image/jpeg ;;
    *.webp) MIME=image/webp ;;
    *.gif) MIME=image/gif ;;
    *) MIME=image/png ;;
esac
DATA_URL="data:$MIME;base64,$(base64 < "$IMAGE_FILE" | tr -d '\n')"

# Request bodies go through a file: a data URL is larger than one command-line argument may be.
BODY=$(mktemp)
trap 'rm -f "$BODY"' EXIT

# chat BODY_JSON [curl options...]: POST /chat/completions
chat() {
    printf '%s' "$1" > "$BODY"
    shift
    curl -sS --fail-with-body "$@" "$BASE_URL/chat/completions" \
        -H "Authorization: Bearer $API_KEY" -H "Content-Type: application/json" --data-binary "@$BODY"
    echo
}

image() { printf '{"type": "image_url", "image_url": {"url": "%s"}}' "$1"; }
text() { printf '{"type": "text", "text": "%s"}' "$1"; }

echo "# 1. a local image"
chat "{\"model\": \"$MODEL\", \"max_tokens\": $MAX_TOKENS, \"temperature\": 0,
  \"messages\": [{\"role\": \"user\", \"content\": [$(image "$DATA_URL"), $(text "What is in this image?")]}]}"

if [ -n "$IMAGE_URL" ]; then
    echo "# 2. an image URL, streamed (server-sent events; the server fetches the URL)"
    chat "{\"model\": \"$MODEL\", \"max_tokens\": $MAX_TOKENS, \"temperature\": 0, \"stream\": true,
  \"messages\": [{\"role\": \"user\", \"content\": [$(image "$IMAGE_URL"), $(text "Describe the image.")]}]}" -N

    echo "# 3. two images in one question"
    chat "{\"model\": \"$MODEL\", \"max_tokens\": $MAX_TOKENS, \"temperature\": 0,
  \"messages\": [{\"role\": \"user\", \"content\": [$(image "$DATA_URL"), $(image "$IMAGE_URL"),
  $(text "What differs between the two images?")]}]}"
fi
