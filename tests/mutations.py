"""Mutation check of the core math (`make mutants`): each slip below must fail at least one fast test.

Each mutant is applied to a fresh scratch copy of the project's code (rlhf/, tasks/, flows/, tests/ and
pyproject.toml in a temporary folder; the working tree is never touched), then the reference tests run
there, with the copy first on the import path. A mutant is *killed* when a test fails, *survived* when
all pass; the unmutated copy must pass first, or nothing is measured. Exit status 0 only if every mutant
is killed.

    .venv/bin/python tests/mutations.py [--only a,b] [--keep]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("rlhf", "tasks", "flows", "tests")
TESTS = ["tests/test_reference_math.py", "tests/test_metrics.py"]
FIT_TESTS = (
    "tests/test_curves.py::test_rl_fit_recovers_known_alpha_beta_and_the_peak",
    "tests/test_curves.py::test_best_of_n_fit_recovers_known_alpha_beta_from_kl_bounds",
    "tests/test_curves.py::test_rl_fit_finds_a_noisy_curves_peak_closer_than_fitting_r_over_d_and_its_interval_covers_it",
)
NLL_TESTS = (
    "tests/test_forgetting.py::test_batched_nll_equals_a_direct_per_sequence_computation",
    "tests/test_forgetting.py::test_encode_scores_from_the_first_token_a_bos_precedes",
)

# (f): wraps response_logprobs so that whatever temperature a caller passes, the log-probs are taken at 1.
DROP_TEMPERATURE = """

import functools as _functools
import inspect as _inspect


def _drop_temperature(f):
    signature = _inspect.signature(f)

    @_functools.wraps(f)
    def wrapper(*args, **kw):
        bound = signature.bind(*args, **kw)
        bound.arguments["temperature"] = 1.0
        return f(*bound.args, **bound.kwargs)

    return wrapper


response_logprobs = _drop_temperature(response_logprobs)
"""


@dataclass
class Mutant:
    key: str
    what: str
    path: str
    old: str | None  # the text replaced (it must occur exactly once); None: `new` is appended to the file
    new: str
    needs: str | None = None  # a regex the file must match for the mutant to apply (else: not applicable)
    tests: tuple[str, ...] = ()  # tests run besides TESTS (pytest node ids: the fast ones that guard the file)


MUTANTS = [
    Mutant(
        "a",
        "the hidden state that predicts a token taken at pos instead of pos - 1",
        "rlhf/ml/logits.py",
        "before = (pos - 1).clamp(",
        "before = pos.clamp(",
    ),
    Mutant(
        "b", "PPO's KL penalty sign flipped", "rlhf/ml/methods/ppo.py", "rewards = -beta * kl", "rewards = beta * kl"
    ),
    Mutant(
        "c",
        "KL direction swapped where sequence_kl calls token_kl",
        "rlhf/ml/sampling.py",
        "logits.token_kl(policy, ref, ",
        "logits.token_kl(ref, policy, ",
    ),
    Mutant(
        "c2",
        "KL direction swapped inside categorical_kl",
        "rlhf/ml/logits.py",
        "(logp.exp() * (logp - logq))",
        "(logq.exp() * (logq - logp))",
    ),
    Mutant(
        "d",
        "GAE's gamma and lambda swapped",
        "rlhf/ml/methods/ppo.py",
        "    adv = torch.zeros_like(rewards)\n",
        "    gamma, lam = lam, gamma\n    adv = torch.zeros_like(rewards)\n",
    ),
    Mutant(
        "e",
        "chosen and rejected rewards swapped in the (combined objective's) Bradley-Terry loss",
        "rlhf/ml/rm_objectives.py",
        "chosen, rejected = torch.chunk(",
        "rejected, chosen = torch.chunk(",
    ),
    Mutant(
        "e2",
        "chosen and rejected gold scores swapped by the collator (absolute, combined)",
        "rlhf/ml/rm_objectives.py",
        "[e[GOLD[0]] for e in examples] + [e[GOLD[1]] for e in examples]",
        "[e[GOLD[1]] for e in examples] + [e[GOLD[0]] for e in examples]",
    ),
    Mutant(
        "f",
        "the sampling temperature dropped from the log-probs",
        "rlhf/ml/sampling.py",
        None,
        DROP_TEMPERATURE,
        needs=r"def response_logprobs\([^)]*\btemperature\b",
    ),
    Mutant(
        "g",
        "Gao fits weighted by 1/d² again (least squares on R/d instead of R)",
        "rlhf/evaluation/fits.py",
        "np.linalg.lstsq(x, y, rcond=None)",
        "np.linalg.lstsq(x / d[:, None], y / d, rcond=None)",
        tests=FIT_TESTS,
    ),
    Mutant(
        "g2",
        "the RL form's peak at exp(alpha/beta) instead of exp(alpha/beta - 1)",
        "rlhf/evaluation/fits.py",
        "exponent = alpha / beta - 1",
        "exponent = alpha / beta",
        tests=FIT_TESTS,
    ),
    Mutant(
        "h",
        "held-out NLL scores the context too (the mask from position 0)",
        "rlhf/ml/nll.py",
        "scored = (pos >= start[:, None]) & (pos < length[:, None])",
        "scored = pos < length[:, None]",
        tests=NLL_TESTS,
    ),
    Mutant(
        "h2",
        "held-out NLL shifted by one: the first scored token left out",
        "rlhf/ml/nll.py",
        "scored = (pos >= start[:, None])",
        "scored = (pos > start[:, None])",
        tests=NLL_TESTS,
    ),
]


def scratch_copy(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "artifacts", "*.pyc")
    for name in COPIED:
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", dest)


def apply(m: Mutant, dest: Path) -> str | None:
    """Patch the copy; None if applied, else why not."""
    path = dest / m.path
    text = path.read_text()
    if m.needs and not re.search(m.needs, text):
        return f"not applicable: {m.path} does not match {m.needs!r}"
    if m.old is None:
        path.write_text(text + m.new)
        return None
    if text.count(m.old) != 1:
        return f"not applied: {m.old!r} occurs {text.count(m.old)} times in {m.path} (update the mutant)"
    path.write_text(text.replace(m.old, m.new))
    return None


def run_tests(dest: Path, tests: list[str]) -> tuple[int, str, float]:
    env = {**os.environ, "PYTHONPATH": str(dest), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    where = subprocess.run(
        [sys.executable, "-c", "import rlhf; print(rlhf.__file__)"], cwd=dest, env=env, capture_output=True, text=True
    )
    if not where.stdout.strip().startswith(str(dest)):  # the copy must be what the tests import
        sys.exit(f"the scratch copy is not what imports: rlhf from {where.stdout.strip() or where.stderr}")
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
    done = subprocess.run(cmd, cwd=dest, env=env, capture_output=True, text=True)
    return done.returncode, done.stdout + done.stderr, time.monotonic() - t0


def failures(output: str) -> str:
    """The failed tests, by name (from pytest's short summary)."""
    found = re.findall(r"^(?:FAILED|ERROR) tests/\S+?::(\S+)", output, re.M)
    return ", ".join(found) if found else (output.strip().splitlines() or ["?"])[-1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", help="comma-separated mutant keys (default: all)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folders (their paths are printed)")
    args = ap.parse_args()
    chosen = [m for m in MUTANTS if not args.only or m.key in args.only.split(",")]
    with tempfile.TemporaryDirectory(prefix="rlhf-mutants-") as tmp:
        base = Path(tmp) / "base"
        scratch_copy(base)
        every = TESTS + sorted({t for m in chosen for t in m.tests})
        rc, out, secs = run_tests(base, every)
        if rc != 0:
            print(out[-3000:])
            print(f"the unmutated copy fails its tests (exit {rc}): no mutant can be judged")
            return 2
        print(f"unmutated copy: tests pass ({secs:.0f} s); tests run per mutant: {' '.join(TESTS)} and its own\n")
        rows = []
        for m in chosen:
            dest = Path(tmp) / f"mutant-{m.key}"
            shutil.copytree(
                base, dest, ignore=shutil.ignore_patterns("__pycache__")
            )  # the tested snapshot, not the live tree (others may be editing it)
            why = apply(m, dest)
            if why:
                rows.append((m, "NOT RUN", why))
            else:
                rc, out, secs = run_tests(dest, TESTS + list(m.tests))
                if rc == 1:
                    rows.append((m, "killed", f"by {failures(out)} ({secs:.0f} s)"))
                elif rc == 0:
                    rows.append((m, "SURVIVED", f"every test passed ({secs:.0f} s)"))
                else:
                    rows.append((m, "ERROR", f"pytest exit {rc}: {failures(out)}"))
            print(f"({m.key}) {m.what}\n     {rows[-1][1]}: {rows[-1][2]}", flush=True)
            if args.keep:
                kept = Path(tempfile.mkdtemp(prefix=f"rlhf-mutant-{m.key}-"))
                shutil.copytree(dest, kept, dirs_exist_ok=True)
                print(f"     kept in {kept}")
        killed = sum(status == "killed" for _, status, _ in rows)
        print(f"\n{killed}/{len(rows)} mutants killed")
        return 0 if killed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
