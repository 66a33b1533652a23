"""Training steps on several processes: `runtime.num_processes` ranks under `accelerate launch`.

`rlhf train_rm r02` with num_processes > 1 starts `accelerate launch ... -m rlhf train_rm r02`; each rank runs
the same step function, TRL's trainers wrap the model in DDP (NCCL on GPUs, gloo on CPU), and the batch
sizes in params.yaml stay global: each rank takes batch_size / num_processes of every step. Only the main
rank (RANK 0) writes: rlhf/core/io.py's writers do nothing on the others (rlhf/core/ranks.py). With
`runtime.accelerate_config` the launch reads that file (DeepSpeed, FSDP, several nodes); otherwise it is a
plain `--multi_gpu` launch on this machine, which on a machine without a GPU gives real gloo ranks on the CPU.
Under FSDP or DeepSpeed every rank takes part in gathering the weights before rank 0 saves them, and every
forward pass of a trained model goes through the trainer's engine (rlhf/ml/models.py: save, engine).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from rlhf.core.processes import dying_with_parent, free_port

TRAINING_STEPS = ("prepare", "train_rm", "update_policy")


def command(cfg, step: str, rnd: str) -> list[str] | None:
    """The `accelerate launch` command for this step, or None to run it in this process (one process and no
    accelerate config asked for, not a training step, or already a rank of a launch). An accelerate config is
    launched even for one process: DeepSpeed's ZeRO offload, say, is worth it on a single GPU."""
    rt = cfg.runtime
    if (rt.num_processes == 1 and not rt.accelerate_config) or step not in TRAINING_STEPS or "LOCAL_RANK" in os.environ:
        return None
    if rt.accelerate_config:
        how = ["--config_file", rt.accelerate_config]
    else:  # this machine only; a free port, so that two runs (e.g. a study's) never meet on accelerate's default
        how = [
            "--multi_gpu",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
        ]
    args = [step] if step == "prepare" else [step, rnd]
    return dying_with_parent(
        "accelerate.commands.launch", *how, "--num_processes", str(rt.num_processes), "-m", "rlhf", *args
    )


def run(cmd: list[str]) -> int:
    """Run the launch; the ranks' stdout passes through, their stderr too, less the launcher's own report of
    a failed rank (a traceback of torch's elastic agent): the rank's `error: ...` line says what went wrong,
    once. Returns 2 when a rank failed with such a line (as the CLI does), else the launcher's exit status."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, bufsize=1)
    errors: list[str] = []
    launcher_report = False
    for line in proc.stderr:
        launcher_report |= bool(re.match(r"(E\d{4} .*failed \(exitcode|W\d{4} .*closing signal)", line))
        if line.startswith("error: "):
            if line in errors:  # every rank hits the same bad input
                continue
            errors.append(line)
        if not launcher_report:
            sys.stderr.write(line)
    code = proc.wait()
    if code and not errors:
        print(f"error: a rank of `accelerate launch` failed (exit status {code}); its output is above", file=sys.stderr)
    return 2 if code and errors else code


def finish() -> None:
    """Leave the process group cleanly at the end of a rank's step (torch warns otherwise)."""
    dist = sys.modules.get("torch.distributed")  # not imported: no process group, and no import to pay for
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
