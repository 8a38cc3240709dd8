"""Subprocess body of tests.helpers.engine.offline_chat: build vllm.LLM, run greedy chats, write JSON."""

import json
import sys


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    from vllm import LLM, SamplingParams

    llm = LLM(model=spec["model"], **spec["llm_kwargs"])
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, logprobs=spec["logprobs"])
    outputs = llm.chat(spec["conversations"], params)
    results = []
    for out in outputs:
        o = out.outputs[0]
        lps = None
        if o.logprobs is not None:
            lps = [step[tok].logprob for step, tok in zip(o.logprobs, o.token_ids)]
        results.append(
            {"text": o.text, "token_ids": list(o.token_ids), "logprobs": lps, "prompt_token_ids": list(out.prompt_token_ids)}
        )
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
